"""The event log's schema: every event a process writes, who writes it, and its fields.

The event log (``common.events``) is a file users read, grep and plot, so its names are
an interface: this module declares every one, with the fields it may carry, each field
with one meaning across events (``FIELDS``). ``docs/RESULTS.md`` lists them, generated
from here (``python -m scripts.eventref``; ``tests/test_eventref.py`` checks the page, every
emitting call of the code and the names ``scripts.timeline`` reads).

``EventLog.emit`` checks each event against this schema (a dict lookup and a set
difference). An undeclared event or field raises ``EventSchemaError`` where ``strict()``
(``FEDFLY_STRICT_EVENTS=1``: the test suite sets it for itself and every process it
starts); elsewhere the line is written all the same, with a warning once per event
name: a run in the field never loses an event to its own schema.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Set in the tests' environment (tests/conftest.py): an undeclared event or field raises.
STRICT_ENV = "FEDFLY_STRICT_EVENTS"

# What every line has, whatever the event (``common.events.EventLog._line``).
COMMON = {
    "ts": "Unix time, seconds",
    "process": "the process that wrote the line (central, edge1, device3, ...)",
    "role": "its role: central, edge or device",
    "event": "the event's name (below)",
    "cpu_percent": "the process's CPU use since its previous line (null when it could not be read)",
    "rss_mb": "the process's resident memory, MiB (null when it could not be read)",
}

# Every field an event may carry, with its one meaning.
FIELDS = {
    "accepted": "the command was taken (bool)",
    "adopt": "the last round whose update of the device the central aggregated (its returns are folded in)",
    "action": "the edge's answer to an attach: continue, wait or done",
    "after_pull": "the offer came after a pull was already asked (bool)",
    "arrived": "the offered session is here already (bool)",
    "at_s": "seconds since the run started",
    "burst": "reports a device's link may send at once",
    "by": "who did it: a cut's cause (controller, trace), the edge that declined, the edge that asked",
    "compute_seconds": "the device's own compute in the round, seconds",
    "confirmed": "the peer confirmed (bool)",
    "connect_ms": "how long opening the connection ahead took, ms",
    "connect_wait_ms": "how long the move waited for the connection opened ahead, ms",
    "count": "lines lost since the last such line",
    "cut": "the link was lost to a cut (bool)",
    "delivered": "the round's update had reached the central (bool)",
    "delivered_by": "the identity of the link a report came on (device NAME, edge NAME)",
    "detail": "what happened, in words (an error's text, at most a few hundred characters)",
    "detected_s": "from the peer's last sign of life to the fault being noticed, seconds",
    "device": "the device concerned",
    "device_step": "the step the device is at",
    "devices": "the testbed's devices",
    "distance": "the update's distance from the others' (robust aggregation)",
    "down_s": "from the fault to the work going on again, seconds",
    "dropped": "how many (reports, devices) were dropped",
    "edge": "the edge concerned (for a device: the edge it is on)",
    "edge_steps": "steps the edge trained for the device in the round",
    "edges": "the testbed's edges",
    "error": "the error's type (TimeoutError, AuthenticationError, ...)",
    "eval_seconds": "evaluating the global model, seconds",
    "final_model_sha256": "SHA-256 of the final global weights (null if there are none)",
    "first": "the first time (bool)",
    "from": "the edge a device moved from",
    "got_step": "the step of the session that came",
    "handover": "the handover kind in force (faults/mobility settings)",
    "have_round": "the round of what this edge holds",
    "have_step": "the step of what this edge holds",
    "have_steps": "the steps of the replicas this edge holds",
    "holder": "the edge that holds the session",
    "home": "the device's edge in the config",
    "host": "the address listened on",
    "how": "how the session was found: here, pull, offer, replica, relay, join, ...",
    "interval_s": "the interval of the rate limit, seconds",
    "kind": "the kind (of a fault, an attach, an error notice)",
    "missing": "devices whose update did not come",
    "mode": "the migration mode (fedfly or classic)",
    "offered": "the session went by offer, not by pull (bool)",
    "on": "what it happened on (the event handled, the state machine's event)",
    "participants": "the devices taking part in the round",
    "pause_ms": "the device's pause for the move, ms",
    "peer": "the other end (a connection, the process a fault concerns)",
    "port": "the port listened on",
    "preconnected": "the move used a connection opened ahead (bool)",
    "process": "the process a fault happened to (on a `fault` line it stands where the writer's name would)",
    "rate": "reports a second a device's link may send beyond the burst",
    "ratio": "the update's norm against the others' (robust aggregation)",
    "reason": "why, in words",
    "recovery": "how the work went on after a fault",
    "refused": "devices whose update was refused",
    "rejoin": "the edge had joined before (bool)",
    "replayed": "steps trained again",
    "restarts": "times the device's round went back to a step it kept",
    "resume_step": "the step the edge goes on from",
    "round": "the round",
    "run": "the run's name",
    "samples": "training samples",
    "samples_lost": "samples of training that did not reach the round",
    "seconds": "a duration, seconds (the round's, a cut's)",
    "silent_s": "how long the peer had been silent, seconds",
    "slowdown": "the device's configured slowdown factor",
    "source": "the edge a session comes from (the device's previous edge)",
    "state": "a session's state (edge.lifecycle), or the state a message found it in",
    "state_bytes": "the session's size on the wire, bytes",
    "status": "how the run ended: finished, stopped, failed",
    "step": "the step (in the round)",
    "step_ms": "the device's mean step, ms",
    "steps": "steps in the round",
    "suppressed": "refusals not logged one by one",
    "test_accuracy": "the global model's accuracy on the test set, in [0, 1]",
    "test_loss": "the global model's loss on the test set",
    "threads": "intra-op threads of the process",
    "throttle_seconds": "time the device slept to emulate its slowdown, seconds",
    "to": "the edge a device goes to",
    "total": "lines lost since the process started",
    "train_seconds": "training time in the round, seconds",
    "transfer_ms": "moving the session between edges, ms",
    "type": "a message type",
    "update_ratio_max": "the largest update norm ratio of the round (robust aggregation)",
    "via": "the edge a report or a session went through",
    "waited_s": "how long it waited, seconds",
    "was": "the session's state before",
    "what": "what it concerns",
    "why": "why, as a word (an attach: start, move, reconnect; a fallback's cause)",
}


@dataclass(frozen=True)
class EventType:
    by: tuple[str, ...]        # the roles that write it
    what: str                  # when it is written
    fields: tuple[str, ...]    # the fields it may carry (not all each time)


def _e(by: str, what: str, fields: str = "") -> EventType:
    return EventType(tuple(by.split()), what, tuple(fields.split()))


_FAULT = "at_s kind process peer round step detail detected_s down_s replayed recovery samples_lost delivered_by via"
_MIGRATION = "device from to round step mode handover how pause_ms state_bytes transfer_ms delivered_by via"

EVENTS: dict[str, EventType] = {
    # -- any process -----------------------------------------------------------------------------
    "events_dropped": _e("central edge device", "event lines were lost (a full disk): how many", "count total"),
    "protocol_error": _e("central edge device", "a connection was refused or closed for what it sent or who it is",
                         "peer detail error"),
    "refused": _e("central edge device", "a listener refused a connection before its handshake (rate-limited)",
                  "peer detail"),
    "refused_suppressed": _e("central edge device", "how many refusals were not logged one by one",
                             "suppressed interval_s"),
    "listening": _e("central edge", "the process listens", "host port run"),
    "round_start": _e("central edge device", "a round starts (on the device: its work for the round)",
                      "round participants steps edge step"),
    "round_done": _e("central device", "a round is done: the central's summary of it, or the device's update taken",
                     "round seconds eval_seconds test_accuracy test_loss samples missing dropped samples_lost refused "
                     "update_ratio_max steps train_seconds restarts edge compute_seconds throttle_seconds step_ms"),
    "shutdown": _e("edge device", "the central said stop", "reason"),
    "error": _e("edge device", "the process cannot go on", "detail error"),
    # -- central ---------------------------------------------------------------------------------
    "testbed_ready": _e("central", "every edge and device is up", "edges devices"),
    "edge_joined": _e("central", "an edge joined (again)", "edge rejoin"),
    "edge_error": _e("central", "an edge sent an ErrorNotice", "edge kind detail"),
    "unexpected": _e("central", "an edge sent a message the central does not take", "edge type"),
    "fault": _e("central", "a fault, as recorded in summary.json (docs/FAULTS.md)", _FAULT),
    "migration": _e("central", "a move, as recorded in summary.json", _MIGRATION),
    "update_held": _e("central", "an update for a round not started yet, kept", "device edge round"),
    "update_late": _e("central", "an update from a device dropped from its round", "device edge round"),
    "update_ignored": _e("central", "an update not counted (a duplicate, stale, ...)", "device edge round why"),
    "update_refused": _e("central", "an update refused (not finite, or an outlier)",
                         "round device edge reason distance ratio"),
    "checkpoint_failed": _e("central", "the central's checkpoint could not be written", "what detail"),
    "failed": _e("central", "the run failed", "reason"),
    "stopped": _e("central", "the run was stopped (a signal)", "reason"),
    "finished": _e("central", "the run ended, whatever the status", "status reason final_model_sha256"),
    # -- edge: its central -------------------------------------------------------------------------
    "central_up": _e("edge", "the edge joined the central", "run first"),
    "central_down": _e("edge", "the edge lost the central", "detail"),
    "central_rejoined": _e("edge", "the edge joined the central again"),
    "central_error": _e("edge", "the central sent an ErrorNotice", "kind detail"),
    "central_link_lost": _e("edge", "the link to the central ended", "detail error"),
    "core_error": _e("edge", "handling one event failed (the edge goes on)", "on device error detail"),
    # -- edge: devices and sessions --------------------------------------------------------------------
    "attached": _e("edge device", "a device attached (on the device: its first attach)",
                   "device kind why source round step state edge home action how"),
    "other_run": _e("edge", "a device attached naming another run", "device run"),
    "detached": _e("edge", "a device's link ended", "device state detail silent_s"),
    "session_state": _e("edge", "a session changed state (docs/PROTOCOL.md, the table)", "device state was on"),
    "awaiting_round": _e("edge", "a device waits for the edge to start its round", "device round"),
    "device_done": _e("edge", "a device's update for the round", "device round samples steps train_seconds edge_steps"),
    "stale_step": _e("edge", "a step for a session not here or not at that step", "device round step state"),
    "step_replayed": _e("edge", "a step the edge had trained, answered from its kept reply", "device round step"),
    "stale_update": _e("edge", "a device's update for a round not running", "device round state"),
    "reports_dropped": _e("edge", "a device sent reports beyond its rate", "device dropped burst rate"),
    "request_unproven": _e("edge", "a session request without the device's proof", "type device by"),
    # -- edge: handovers ---------------------------------------------------------------------------------
    "handing_over": _e("edge", "a session leaves for another edge", "device round step to offered"),
    "handed_over": _e("edge", "a session was taken by another edge", "device round step to"),
    "handover_confirmed": _e("edge", "the edge a session went to confirmed it", "device source round step offered"),
    "handover_unconfirmed": _e("edge", "no confirmation came for a session handed over",
                               "device source round step detail offered"),
    "handover_cancelled": _e("edge", "a handover was called off", "device round step"),
    "handover_refused": _e("edge", "a pull was refused (the session is not here as asked)",
                           "device round step to state have_round have_step"),
    "left": _e("edge", "a device left for another edge", "device round step to offered"),
    "migrated_in": _e("edge", "a session arrived and was installed",
                      "device source round step state_bytes transfer_ms offered"),
    "pull_failed": _e("edge", "pulling a session failed", "device source round step detail"),
    "pull_stale": _e("edge", "a pull's outcome came too late to count", "device source"),
    "pull_superseded": _e("edge", "a pull brought an older step than the device is at",
                          "device source round step got_step"),
    "pull_deadline": _e("edge", "a pull had no outcome in time", "device waited_s"),
    "pull_answered_by_offer": _e("edge", "a pull was answered by the session offered already", "device round step to"),
    "drop_sent": _e("edge", "the source was told to drop a session", "device source round confirmed"),
    "offer_awaited": _e("edge", "a device came for a session offered to this edge",
                        "device source round step arrived after_pull"),
    "offer_declined": _e("edge", "the edge offered a session declined it", "device round step by"),
    "offer_dropped": _e("edge", "an offered session was dropped (declined, or its device went elsewhere)", "device source round step why"),
    "offer_failed": _e("edge", "offering a session failed", "device source detail"),
    "replica_given": _e("edge", "a replica was handed to the edge that asked", "device round step to"),
    "replica_refused": _e("edge", "a replica was asked for and not given", "device round to have_steps"),
    "replica_installed": _e("edge", "a session lost with its edge went on from a replica",
                            "device source round step device_step"),
    "replica_damaged": _e("edge", "a replica failed its checksum", "device detail"),
    "replica_failed": _e("edge", "sending a replica to the buddy failed", "device round step to detail"),
    "relay_serving": _e("edge", "this edge trains a session for a device attached elsewhere", "device round step via"),
    "relay_refused": _e("edge", "a relay was refused", "device round step to"),
    "relay_fallback": _e("edge", "a relay could not be used: the session is pulled instead",
                         "device source round step to why"),
    "relaying": _e("edge", "this edge relays a device's steps to the edge holding its session",
                   "device round step holder"),
    "session_dropped": _e("edge", "a session was dropped on its new edge's word (pulls of it now go there)",
                          "device round to"),
    # -- device ------------------------------------------------------------------------------------
    "data_loaded": _e("device", "the device's shard is loaded", "samples threads slowdown"),
    "link_lost": _e("device", "the link to the edge was lost", "edge detail silent_s cut round step"),
    "reconnect_failed": _e("device", "a try to reattach to an edge failed", "edge detail"),
    "reattached": _e("device", "back on an edge after a loss", "edge source action resume_step how down_s"),
    "cut": _e("device", "the radio is cut (a drop)", "seconds to edge by"),
    "move_command": _e("device", "the controller asked for a move", "to accepted reason"),
    "drop_command": _e("device", "the controller asked for a drop", "seconds to accepted reason"),
    "move_announced": _e("device", "a move was announced a step ahead", "to round step"),
    "preconnect": _e("device", "a connection to the next edge is opened ahead of a move", "to round step"),
    "moved": _e("device", "a move is done",
                "source to round step pause_ms state_bytes transfer_ms resume_step how preconnected "
                "connect_wait_ms connect_ms"),
    "move_failed": _e("device", "a move failed: the device reconnects as after a loss",
                      "to round step reason preconnected"),
    "move_skipped": _e("device", "a move was not made (the device is on that edge already)", "to round step reason"),
    "rollback": _e("device", "the device goes back to a step it kept", "round step to how"),
    "round_over": _e("device", "the device's round ended before its work", "round step delivered reason"),
    "resumed_from_disk": _e("device", "a restarted device went on from its checkpoint", "round step resume_step how"),
    "checkpoint_unused": _e("device", "a checkpoint on disk was not used", "round step action how run"),
    "state_folded": _e("device", "the device folded in what the central returned for its last aggregated update "
                       "(SCAFFOLD's delta into c_i), and wrote it to its disk", "round adopt"),
}

ROLES = ("central", "edge", "device")


def strict() -> bool:
    """Does an undeclared event raise here (read when one is seen, so a test may set it)?"""
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


class EventSchemaError(ValueError):
    """An event or field this schema does not declare."""


def problem(event: str, fields) -> str:
    """Why ``event`` with ``fields`` (names) is not in the schema, or ''."""
    kind = EVENTS.get(event)
    if kind is None:
        return f"event {event!r} is not declared in common/eventschema.py"
    extra = set(fields).difference(kind.fields)
    if extra:
        return f"event {event!r}: fields {sorted(extra)} are not declared in common/eventschema.py"
    return ""
