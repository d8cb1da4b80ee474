#!/usr/bin/env python3
"""A Sagaflow step worker in Python, written from docs/protocol.md alone.

It serves the saga `py_transfer` (debit -> fee -> credit (pivot) -> notify) over NATS JetStream
with the `nats-py` package, speaking protocol version 2, and keeps its idempotency records, the
highest fencing epoch it has seen per partition, the accounts and a ledger in a local SQLite
file. The integration test `tests/integration/python_worker.rs` drives it against a
real engine; the section numbers in the comments refer to docs/protocol.md.

The money rules, so that the test can steer outcomes through the input alone:
- every account opens with a balance of 100 the first time it is seen;
- `debit` takes `amount` from `from` and fails permanently (`insufficient_funds`) when the
  balance is short; `fee` takes 1 more;
- `credit` (the pivot) fails permanently (`account_closed`) when `to` starts with `closed-`;
- `notify` fails retryably (`mail_busy`) on its first attempt, then succeeds.

Secret fields (section 17): the input's optional `reference` (the payer's reference) is secret,
and so is `credit`'s output `receipt` (`rcpt-{reference}-{amount}`); `notify` writes the opened
receipt into its notification. The keys come from `--secret-keys FILE` or the environment
(`SAGAFLOW_SECRET_KEYS_FILE`, `SAGAFLOW_SECRET_KEYS`), as for every Sagaflow program; AES-256-GCM
is the `cryptography` package's.

Tracing (section 16): the worker joins the trace a command's `traceparent` header names (or,
without a valid one, the saga's own trace, whose id is the saga id), makes a `process` span per
command it serves and a `send` span per reply it publishes, and puts the send span in the
reply's `traceparent` (and the command's `tracestate`, unchanged). The spans are exported as
OTLP/HTTP JSON only when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the full URL) or
`OTEL_EXPORTER_OTLP_ENDPOINT` (to which `/v1/traces` is added) is set, under the service name
`OTEL_SERVICE_NAME` (default `py-transfer-worker`); otherwise none are kept.

Run: python3 tests/python/transfer_worker.py --nats-url nats://127.0.0.1:4222 --db /tmp/w.db
It prints `READY <id>` on stdout once its consumer exists and an engine accepted its definition.
"""

import argparse
import asyncio
import base64
import json
import logging
import os
import secrets
import signal
import sqlite3
import sys
import time
import urllib.request
import uuid

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import nats
import nats.errors
import nats.js.errors
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

log = logging.getLogger("py-transfer-worker")

# Section 2, 3, 4, 5, 6.
PROTOCOL_VERSION = 2
COMMAND_STREAM = "SAGAFLOW_COMMANDS"
REPLY_STREAM = "SAGAFLOW_REPLIES"
MAX_MESSAGE_BYTES = 1048576
MAX_OUTPUT_BYTES = 262144
DUPLICATE_WINDOW_SECONDS = 120
START_SUBJECT = "sagaflow.start"
REGISTER_SUBJECT = "sagaflow.register"
ACK_WAIT_SECONDS = 30
MAX_DELIVER = 5
U32_MAX = 4294967295
U64_MAX = 18446744073709551615
# SQLite integers are signed 64-bit; epochs are at most a clock in ms plus one per change of owner.
STORED_EPOCH_MAX = 9223372036854775807

SAGA = "py_transfer"
SAGA_VERSION = 1
OPENING_BALANCE = 100
FEE = 1


def command_subject_filter(saga):
    return f"sagaflow.cmd.{saga}.>"


def reply_message_id(command_id, epoch):
    """Section 6: the reply's Nats-Msg-Id names the command and the epoch it was sent under."""
    return f"reply:{command_id}@{epoch}"


def worker_consumer(saga):
    return f"sagaflow-worker-{saga}"


# Section 7.7: the definition this worker announces.
def retry_policy(max_attempts, non_retryable=(), jitter=0.2):
    return {
        "initial_interval_ms": 50,
        "multiplier": 2.0,
        "max_interval_ms": 1000,
        "max_attempts": max_attempts,
        "jitter": jitter,
        "non_retryable": list(non_retryable),
    }


def step(name, kind, retry, compensation_retry, output_schema, secret_output=()):
    spec = {
        "name": name,
        "kind": kind,
        "retry": retry,
        "compensation_retry": compensation_retry,
        "timeout_ms": 10000,
        # Optional (section 7.7): the engine checks starts against the first step's input schema
        # and an operator's `skip-step --output` against the step's output schema.
        "input_schema": TRANSFER_SCHEMA,
        "output_schema": output_schema,
    }
    if secret_output:
        spec["secret_output"] = list(secret_output)
    return spec


def object_schema(title, properties):
    """A JSON Schema (draft 2020-12) of an object with exactly these required properties."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": title,
        "type": "object",
        "properties": properties,
        "required": list(properties),
    }


# What read_transfer accepts: every step reads the whole saga input. `reference` is optional
# and secret: the engine checks starts against a copy of this schema in which it is "an
# envelope" (section 17).
TRANSFER_SCHEMA = object_schema(
    "Transfer",
    {"from": {"type": "string"}, "to": {"type": "string"}, "amount": {"type": "integer", "minimum": 1}},
)
TRANSFER_SCHEMA["properties"]["reference"] = {"type": "string"}
ACCOUNT = {"type": "string"}
INTEGER = {"type": "integer"}
MOVED_SCHEMA = object_schema("Moved", {"account": ACCOUNT, "amount": INTEGER, "balance": INTEGER})
FEE_SCHEMA = object_schema("FeeTaken", {"account": ACCOUNT, "fee": INTEGER, "balance": INTEGER})
NOTIFIED_SCHEMA = object_schema("Notified", {"notified": ACCOUNT})
CREDITED_SCHEMA = object_schema(
    "Credited", {"account": ACCOUNT, "amount": INTEGER, "balance": INTEGER, "receipt": {"type": "string"}}
)

SPEC = {
    "name": SAGA,
    "version": SAGA_VERSION,
    "deadline_ms": 60000,
    "secret_input": ["reference"],
    "steps": [
        step("debit", "compensatable", retry_policy(5), retry_policy(None), MOVED_SCHEMA),
        step("fee", "compensatable", retry_policy(5), retry_policy(None), FEE_SCHEMA),
        step("credit", "pivot", retry_policy(5, ["account_frozen"]), retry_policy(1, jitter=0.0), CREDITED_SCHEMA, ["receipt"]),
        step("notify", "retriable", retry_policy(None), retry_policy(1, jitter=0.0), NOTIFIED_SCHEMA),
    ],
}


# Section 7.2 / 7.3: outcomes.
def succeeded(output):
    return {"status": "succeeded", "output": output}


def failed(error_class, code, message):
    return {"status": "failed", "error": {"class": error_class, "code": code, "message": message}}


def is_final(outcome):
    """Section 9.3: only successes are recorded; failures run the handler again next time."""
    return outcome["status"] == "succeeded"


class StoreUnavailable(Exception):
    """The idempotency store cannot be read or written: the command must be retried later."""


class Ledger:
    """The worker's SQLite file: idempotency records (section 9), the highest epoch seen per
    partition (rule 9.7) and the data the steps change.

    A step's effect and its idempotency record are written in one transaction, so an effect is
    never applied without its record, and a recorded key never runs its handler again.
    """

    def __init__(self, path):
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
        # The highest epoch per partition as last read from or written to `worker_epochs`.
        self.epochs = {}
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS results (
                idempotency_key TEXT PRIMARY KEY,
                command_id TEXT NOT NULL,
                outcome TEXT NOT NULL
            );
            -- Rule 9.7: the highest fencing epoch seen per partition; it only grows.
            CREATE TABLE IF NOT EXISTS worker_epochs (
                partition_id INTEGER PRIMARY KEY,
                epoch INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS accounts (
                name TEXT PRIMARY KEY,
                balance INTEGER NOT NULL
            );
            -- No unique key on purpose: the test checks that no key was applied twice.
            CREATE TABLE IF NOT EXISTS ledger (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                idempotency_key TEXT NOT NULL,
                saga_id TEXT NOT NULL,
                step TEXT NOT NULL,
                direction TEXT NOT NULL,
                account TEXT NOT NULL,
                delta INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS notifications (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                idempotency_key TEXT NOT NULL,
                saga_id TEXT NOT NULL,
                text TEXT NOT NULL
            );
            """
        )

    def check_epoch(self, partition, epoch):
        """Rule 9.7 and section 10 step 4: the highest epoch seen for `partition`, after raising
        it to `epoch` when that is higher. A command whose epoch is below the returned value is
        stale.

        The raise is committed on its own, before the handler runs, so a failing handler (whose
        transaction is rolled back) does not undo it. The file is read the first time a
        partition is seen and written only when its epoch grows; every other command is checked
        against memory (epochs only grow, so memory never holds more than the file)."""
        known = self.epochs.get(partition)
        if known is not None and epoch <= known:
            return known
        stored = min(epoch, STORED_EPOCH_MAX)
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise StoreUnavailable(str(e)) from e
        try:
            self.db.execute(
                "INSERT INTO worker_epochs (partition_id, epoch) VALUES (?, ?) "
                "ON CONFLICT (partition_id) DO UPDATE "
                "SET epoch = MAX(worker_epochs.epoch, excluded.epoch)",
                (partition, stored),
            )
            highest = self.db.execute(
                "SELECT epoch FROM worker_epochs WHERE partition_id = ?", (partition,)
            ).fetchone()[0]
            self.db.execute("COMMIT")
        except sqlite3.Error as e:
            self.db.execute("ROLLBACK")
            raise StoreUnavailable(str(e)) from e
        self.epochs[partition] = max(highest, known or 0)
        return highest

    def lookup(self, key):
        row = self.db.execute(
            "SELECT outcome FROM results WHERE idempotency_key = ?", (key,)
        ).fetchone()
        return json.loads(row[0]) if row else None

    def answer(self, command, handler):
        """Sections 9 and 10 steps 5-6: the recorded outcome, or run the handler and record a
        final outcome (insert-if-absent; the record that stands wins)."""
        key = command["idempotency_key"]
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise StoreUnavailable(str(e)) from e
        try:
            recorded = self.lookup(key)
            if recorded is not None:
                self.db.execute("COMMIT")
                return recorded
        except sqlite3.Error as e:
            self.db.execute("ROLLBACK")
            raise StoreUnavailable(str(e)) from e
        try:
            outcome = handler(self, command)
        except Exception as e:  # a crashing handler is a retryable failure (section 10)
            log.exception("handler for %s crashed", command["command_id"])
            self.db.execute("ROLLBACK")
            return failed("retryable", "handler_crashed", f"the step handler raised {e!r}")
        if not is_final(outcome):
            # Nothing is recorded, and nothing the handler did may stay.
            self.db.execute("ROLLBACK")
            return outcome
        size = len(json.dumps(outcome["output"], separators=(",", ":"), ensure_ascii=False).encode())
        if size > MAX_OUTPUT_BYTES:
            # Rule 9.3: an output over the limit is not recorded, and the effect shares the
            # record's transaction, so it is rolled back with it; the retry runs it again.
            self.db.execute("ROLLBACK")
            return failed(
                "retryable",
                "output_too_large",
                f'step `{command["step"]}` returned {size} bytes of output, over the {MAX_OUTPUT_BYTES} byte limit',
            )
        try:
            self.db.execute(
                "INSERT OR IGNORE INTO results (idempotency_key, command_id, outcome) VALUES (?, ?, ?)",
                (key, command["command_id"], json.dumps(outcome)),
            )
            standing = self.lookup(key)
            self.db.execute("COMMIT")
            return standing
        except sqlite3.Error as e:
            self.db.execute("ROLLBACK")
            raise StoreUnavailable(str(e)) from e

    # Helpers for the handlers, called inside the transaction of `answer`.
    def balance(self, account):
        self.db.execute(
            "INSERT OR IGNORE INTO accounts (name, balance) VALUES (?, ?)",
            (account, OPENING_BALANCE),
        )
        return self.db.execute("SELECT balance FROM accounts WHERE name = ?", (account,)).fetchone()[0]

    def move(self, command, account, delta):
        self.balance(account)
        self.db.execute("UPDATE accounts SET balance = balance + ? WHERE name = ?", (delta, account))
        self.db.execute(
            "INSERT INTO ledger (idempotency_key, saga_id, step, direction, account, delta) VALUES (?, ?, ?, ?, ?, ?)",
            (
                command["idempotency_key"],
                command["saga_id"],
                command["step"],
                command["direction"],
                account,
                delta,
            ),
        )
        return self.balance(account)


# The step handlers: (ledger, command) -> outcome. They run inside one SQLite transaction.
def read_transfer(command):
    data = command["input"]
    ok = (
        isinstance(data, dict)
        and isinstance(data.get("from"), str)
        and isinstance(data.get("to"), str)
        and isinstance(data.get("amount"), int)
        and not isinstance(data.get("amount"), bool)
        and data["amount"] > 0
    )
    if not ok:
        return None
    return data["from"], data["to"], data["amount"]


def bad_data(command):
    return failed(
        "permanent",
        "bad_data",
        f'step `{command["step"]}` needs input {{"from": str, "to": str, "amount": int > 0}}, got {json.dumps(command["input"])[:200]}',
    )


def debit(ledger, command):
    transfer = read_transfer(command)
    if transfer is None:
        return bad_data(command)
    source, _, amount = transfer
    if ledger.balance(source) < amount:
        return failed(
            "permanent",
            "insufficient_funds",
            f"account {source} holds {ledger.balance(source)}, cannot debit {amount}",
        )
    balance = ledger.move(command, source, -amount)
    return succeeded({"account": source, "amount": amount, "balance": balance})


def fee(ledger, command):
    transfer = read_transfer(command)
    if transfer is None:
        return bad_data(command)
    source = transfer[0]
    if ledger.balance(source) < FEE:
        return failed("permanent", "insufficient_funds", f"account {source} cannot pay the fee")
    balance = ledger.move(command, source, -FEE)
    return succeeded({"account": source, "fee": FEE, "balance": balance})


def credit(ledger, command):
    transfer = read_transfer(command)
    if transfer is None:
        return bad_data(command)
    _, target, amount = transfer
    if target.startswith("closed-"):
        return failed("permanent", "account_closed", f"account {target} is closed")
    balance = ledger.move(command, target, amount)
    reference = command["input"].get("reference", "none")
    receipt = f"rcpt-{reference}-{amount}"
    return succeeded({"account": target, "amount": amount, "balance": balance, "receipt": receipt})


def notify(ledger, command):
    if command["attempt"] == 1:
        return failed("retryable", "mail_busy", "the mail relay is busy")
    transfer = read_transfer(command)
    if transfer is None:
        return bad_data(command)
    source, target, amount = transfer
    receipt = command["outputs"].get("credit", {}).get("receipt", "none")
    ledger.db.execute(
        "INSERT INTO notifications (idempotency_key, saga_id, text) VALUES (?, ?, ?)",
        (command["idempotency_key"], command["saga_id"], f"{source} sent {amount} to {target}, receipt {receipt}"),
    )
    return succeeded({"notified": source})


def undo(ledger, command):
    """Section 9.6: undo whatever the forward action's key did; nothing to undo is a success."""
    rows = ledger.db.execute(
        "SELECT account, delta FROM ledger WHERE idempotency_key = ?", (command["forward_key"],)
    ).fetchall()
    for account, delta in rows:
        ledger.move(command, account, -delta)
    return succeeded(None)


HANDLERS = {
    ("debit", "forward"): debit,
    ("debit", "compensate"): undo,
    ("fee", "forward"): fee,
    ("fee", "compensate"): undo,
    ("credit", "forward"): credit,
    ("notify", "forward"): notify,
}


# Section 17: secret fields.
ENVELOPE = "$sagaflow_secret"


class SecretUnreadable(Exception):
    """An envelope that does not open: a permanent `secret_unreadable` error."""

    def __init__(self, field, kid, reason):
        super().__init__(f"secret field `{field}` (key `{kid}`): {reason}")


class SecretKeys:
    """Keys by id, the first one sealing: the key file's `KID:BASE64` entries (section 17)."""

    def __init__(self, text):
        self.keys = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            for entry in filter(None, (e.strip() for e in line.split(","))):
                kid, _, encoded = entry.partition(":")
                key = base64.b64decode(encoded.strip(), validate=True)
                if len(key) != 32:
                    raise ValueError(f"key `{kid}` is {len(key)} bytes, not 32")
                self.keys.append((kid.strip(), AESGCM(key)))

    @classmethod
    def load(cls, path, environ=os.environ):
        path = path or environ.get("SAGAFLOW_SECRET_KEYS_FILE")
        if path:
            with open(path, encoding="utf-8") as f:
                return cls(f.read())
        return cls(environ.get("SAGAFLOW_SECRET_KEYS", ""))

    def seal(self, field, value):
        if not self.keys:
            raise SecretUnreadable(field, "none", "this worker has no secret keys; give it --secret-keys")
        kid, cipher = self.keys[0]
        nonce = secrets.token_bytes(12)
        plaintext = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
        ct = cipher.encrypt(nonce, plaintext, field.encode())
        return {ENVELOPE: {"v": 1, "alg": "A256GCM", "kid": kid,
                           "nonce": base64.b64encode(nonce).decode(), "ct": base64.b64encode(ct).decode()}}

    def open(self, field, value):
        inner = value.get(ENVELOPE)
        kid = inner.get("kid") if isinstance(inner, dict) and isinstance(inner.get("kid"), str) else "none"
        if len(value) != 1 or not isinstance(inner, dict) or set(inner) != {"v", "alg", "kid", "nonce", "ct"}:
            raise SecretUnreadable(field, kid, "malformed envelope")
        if inner["v"] != 1 or inner["alg"] != "A256GCM":
            raise SecretUnreadable(field, kid, f"envelope version {inner['v']} / algorithm {inner['alg']} is not known here")
        cipher = next((c for k, c in self.keys if k == kid), None)
        if cipher is None:
            raise SecretUnreadable(field, kid, "no key with this id among those given")
        try:
            nonce = base64.b64decode(inner["nonce"], validate=True)
            ct = base64.b64decode(inner["ct"], validate=True)
        except (ValueError, TypeError):
            raise SecretUnreadable(field, kid, "the nonce or the ciphertext is not base64")
        if len(nonce) != 12:
            raise SecretUnreadable(field, kid, "the nonce is not 12 bytes")
        try:
            return json.loads(cipher.decrypt(nonce, ct, field.encode()))
        except Exception:
            raise SecretUnreadable(field, kid, "it does not authenticate: it was altered, or sealed for another field")

    def open_members(self, value):
        """`value` with every envelope among its members opened (section 17, rule 2)."""
        if not isinstance(value, dict):
            return value
        return {
            name: self.open(name, member) if isinstance(member, dict) and ENVELOPE in member else member
            for name, member in value.items()
        }

    def opened(self, command):
        """The command as the handler sees it: its input's and outputs' envelopes opened."""
        opened = dict(command)
        opened["input"] = self.open_members(command["input"])
        opened["outputs"] = {step: self.open_members(out) for step, out in command["outputs"].items()}
        return opened

    def sealing(self, handler, secret_output):
        """`handler` with the `secret_output` members of a success sealed before it is recorded."""
        def sealed(ledger, command):
            outcome = handler(ledger, command)
            if outcome["status"] == "succeeded" and isinstance(outcome["output"], dict) and secret_output:
                try:
                    outcome["output"] = {
                        name: self.seal(name, member) if name in secret_output else member
                        for name, member in outcome["output"].items()
                    }
                except SecretUnreadable as e:
                    return failed("permanent", "secret_unreadable", str(e))
            return outcome
        return sealed


# Section 7.1: checking a command against the schema.
def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_u32(value, least=0):
    return is_int(value) and least <= value <= U32_MAX


def is_u64(value):
    return is_int(value) and 0 <= value <= U64_MAX


def is_uuid(value):
    if not isinstance(value, str):
        return False
    try:
        uuid.UUID(value)
        return True
    except ValueError:
        return False


def schema_problem(command):
    """Why `command` is not a step command of the version-2 schema (section 7.1), or None."""
    if not isinstance(command, dict):
        return "not a JSON object"
    checks = [
        ("v", is_u32),
        ("command_id", lambda v: isinstance(v, str)),
        ("saga_id", is_uuid),
        ("saga", lambda v: isinstance(v, str)),
        ("saga_version", lambda v: is_u32(v, least=1)),
        ("partition", is_u32),
        ("epoch", is_u64),
        ("reply_to", lambda v: isinstance(v, str)),
        ("step_index", lambda v: is_int(v) and v >= 0),
        ("step", lambda v: isinstance(v, str)),
        ("direction", lambda v: v in ("forward", "compensate")),
        ("attempt", lambda v: is_u32(v, least=1)),
        ("idempotency_key", lambda v: isinstance(v, str)),
        ("forward_key", lambda v: isinstance(v, str)),
        ("deadline", lambda v: v is None or is_int(v)),
        ("input", lambda v: True),
        ("outputs", lambda v: isinstance(v, dict)),
    ]
    for field, valid in checks:
        if field not in command:
            return f"missing field `{field}`"
        if not valid(command[field]):
            return f"field `{field}` has an invalid value {json.dumps(command[field])[:100]}"
    return None


def names_its_attempt(command):
    """Section 10 step 1: enough of a command to answer it with a `malformed_command` reply,
    where its `reply_to` says."""
    return (
        isinstance(command, dict)
        and isinstance(command.get("reply_to"), str)
        and isinstance(command.get("command_id"), str)
        and is_uuid(command.get("saga_id"))
        and is_int(command.get("step_index"))
        and command["step_index"] >= 0
        and isinstance(command.get("step"), str)
        and command.get("direction") in ("forward", "compensate")
        and is_u32(command.get("attempt"), least=1)
    )


def epoch_of(command):
    """The epoch a reply's Nats-Msg-Id names: the command's, or 0 when it has no integer one."""
    epoch = command.get("epoch")
    return epoch if is_u64(epoch) else 0


# Section 16 (tracing): the W3C trace context a command carries in its headers, the spans this
# worker makes while serving it, and their export over OTLP/HTTP JSON.
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
MSG_ID = "Nats-Msg-Id"
SAMPLED = "01"
SPAN_KIND_PRODUCER = 4
SPAN_KIND_CONSUMER = 5
STATUS_UNSET = 0
STATUS_ERROR = 2
SERVICE_NAME = "py-transfer-worker"
EXPORT_INTERVAL_SECONDS = 0.2
EXPORT_TIMEOUT_SECONDS = 5
MAX_BUFFERED_SPANS = 10000
LOWER_HEX = frozenset("0123456789abcdef")


def is_lower_hex(text, length):
    return len(text) == length and set(text) <= LOWER_HEX


def parse_traceparent(value):
    """Section 16 (tracing): (trace id, parent span id, flags) of a `traceparent` header, or None
    unless it reads `00-<32 hex>-<16 hex>-<2 hex>` in lowercase with neither id all zeros."""
    if not isinstance(value, str):
        return None
    fields = value.strip().split("-")
    if len(fields) != 4:
        return None
    version, trace_id, span_id, flags = fields
    valid = (
        version == "00"
        and is_lower_hex(trace_id, 32)
        and trace_id != "0" * 32
        and is_lower_hex(span_id, 16)
        and span_id != "0" * 16
        and is_lower_hex(flags, 2)
    )
    return (trace_id, span_id, flags) if valid else None


def saga_trace(saga_id):
    """A saga's own trace (section 16): the saga id as the trace id, the id's last 16 hex digits
    as the span id of the saga's root span, sampled."""
    trace_id = uuid.UUID(saga_id).hex
    return trace_id, trace_id[16:], SAMPLED


def header(headers, name):
    """A header's value, or None. nats-py gives the headers as a dict (or None), names as sent."""
    if not headers:
        return None
    if name in headers:
        return headers[name]
    return next((value for key, value in headers.items() if key.lower() == name.lower()), None)


class TraceContext:
    """Where a span sits: its trace, its parent span, the trace flags and the `tracestate` that
    travels with them."""

    def __init__(self, trace_id, parent_id, flags, state=None):
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.flags = flags
        self.state = state

    @property
    def sampled(self):
        return int(self.flags, 16) & 1 == 1


def incoming_context(headers, saga_id):
    """Section 16 (tracing): the parent of the spans for a command: the one its `traceparent`
    names, or else the root span of the saga's own trace."""
    parsed = parse_traceparent(header(headers, TRACEPARENT))
    if parsed is None:
        # A `tracestate` is only meaningful beside the `traceparent` it came with (W3C).
        return TraceContext(*saga_trace(saga_id))
    return TraceContext(*parsed, state=header(headers, TRACESTATE) or None)


def new_span_id():
    span_id = secrets.token_hex(8)
    return span_id if span_id != "0" * 16 else new_span_id()


class Span:
    """One span of this worker; `finish` hands it to the exporter, which may ignore it."""

    def __init__(self, exporter, context, name, kind, attributes, start=None):
        self.exporter = exporter
        self.context = context
        self.span_id = new_span_id()
        self.name = name
        self.kind = kind
        self.attributes = attributes
        self.start = start if start is not None else time.time_ns()
        self.end = None
        self.status = (STATUS_UNSET, "")

    def child(self, name, kind, attributes):
        context = TraceContext(self.context.trace_id, self.span_id, self.context.flags, self.context.state)
        return Span(self.exporter, context, name, kind, attributes)

    def trace_headers(self):
        """Section 16 (tracing): the headers that make this span the parent of a message's reader."""
        context = self.context
        headers = {TRACEPARENT: f"00-{context.trace_id}-{self.span_id}-{context.flags}"}
        if context.state:
            headers[TRACESTATE] = context.state
        return headers

    def fail(self, message):
        self.status = (STATUS_ERROR, message)

    def finish(self):
        if self.end is None:
            self.end = time.time_ns()
            self.exporter.record(self)

    def to_otlp(self):
        code, message = self.status
        return {
            "traceId": self.context.trace_id,
            "spanId": self.span_id,
            "parentSpanId": self.context.parent_id,
            "name": self.name,
            "kind": self.kind,
            "startTimeUnixNano": str(self.start),
            "endTimeUnixNano": str(self.end),
            "attributes": otlp_attributes(self.attributes),
            "status": {"code": code, "message": message},
        }


def messaging_attributes(operation_type, subject, message_id):
    """The OpenTelemetry messaging attributes of a span that reads or sends a NATS message."""
    attributes = {
        "messaging.system": "nats",
        "messaging.operation.type": operation_type,
        "messaging.destination.name": subject,
    }
    if message_id is not None:
        attributes["messaging.message.id"] = message_id
    return attributes


def saga_attributes(command, node):
    """The `sagaflow.*` attributes of a command's spans, from those of its fields that are valid."""
    attributes = {"sagaflow.saga_id": command["saga_id"]}
    for field in ("saga", "step", "direction"):
        if isinstance(command.get(field), str):
            attributes[f"sagaflow.{field}"] = command[field]
    if is_u32(command.get("attempt"), least=1):
        attributes["sagaflow.attempt"] = command["attempt"]
    attributes["sagaflow.node"] = node
    return attributes


def record_outcome(span, outcome):
    """Puts a reply's status on the process span; a permanent failure makes it an error."""
    if span is None:
        return
    span.attributes["sagaflow.outcome"] = outcome["status"]
    error = outcome.get("error")
    if outcome["status"] == "failed" and isinstance(error, dict) and error.get("class") == "permanent":
        span.fail(str(error.get("message", "")))


# OTLP/HTTP JSON: ids in lowercase hex, 64-bit integers as decimal strings.
def otlp_value(value):
    if isinstance(value, bool):
        return {"boolValue": value}
    if is_int(value):
        return {"intValue": str(value)}
    return {"stringValue": str(value)}


def otlp_attributes(attributes):
    return [{"key": key, "value": otlp_value(value)} for key, value in attributes.items()]


def otlp_body(spans, service_name):
    """The body of an OTLP/HTTP JSON export of `spans`."""
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": otlp_attributes({"service.name": service_name})},
                "scopeSpans": [{"scope": {"name": SERVICE_NAME}, "spans": [s.to_otlp() for s in spans]}],
            }
        ]
    }


def traces_url(environ):
    """Where to export spans, from the standard OpenTelemetry variables, or None: no export."""
    url = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if url:
        return url
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return f"{base.rstrip('/')}/v1/traces" if base else None


def post_spans(url, spans, service_name):
    """One blocking POST of an export; raises on any failure, a non-2xx answer included."""
    body = json.dumps(otlp_body(spans, service_name), separators=(",", ":")).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=EXPORT_TIMEOUT_SECONDS) as response:
        response.read()


class SpanExporter:
    """Buffers finished, sampled spans and posts them every 200 ms from a background task, the
    POST running in a thread so that serving never waits on it. Without a URL it keeps nothing.
    A failed export is logged and its spans dropped."""

    def __init__(self, url=None, service_name=SERVICE_NAME):
        self.url = url
        self.service_name = service_name
        self.spans = []
        self.full = False
        self.task = None

    @classmethod
    def from_env(cls, environ=os.environ):
        return cls(traces_url(environ), environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME)

    def record(self, span):
        if self.url is None or not span.context.sampled:
            return
        if len(self.spans) >= MAX_BUFFERED_SPANS:
            if not self.full:
                log.warning("%d spans wait for export; dropping further spans", len(self.spans))
                self.full = True
            return
        self.spans.append(span)

    def start(self):
        if self.url is not None:
            self.task = asyncio.create_task(self.run())

    async def run(self):
        while True:
            await asyncio.sleep(EXPORT_INTERVAL_SECONDS)
            await self.flush()

    async def flush(self):
        spans, self.spans, self.full = self.spans, [], False
        if not spans:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, post_spans, self.url, spans, self.service_name)
        except Exception as e:
            log.warning("exporting %d spans to %s failed (%r); they are dropped", len(spans), self.url, e)

    async def close(self):
        """Stops the background task and exports what is left, once."""
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None
        await self.flush()


def parse_command(data):
    """Section 10 step 1: the command and why it is malformed (None when it is not)."""
    try:
        command = json.loads(data)
        return command, schema_problem(command)
    except ValueError as e:
        return None, f"not JSON: {e}"


class Worker:
    def __init__(self, nc, js, ledger, worker_id, exporter=None, keys=None):
        self.keys = keys if keys is not None else SecretKeys("")
        self.nc = nc
        self.js = js
        self.ledger = ledger
        self.id = worker_id
        self.exporter = exporter if exporter is not None else SpanExporter()

    def reply_to(self, command, outcome):
        """Section 7.2: the reply, copied fields first, outcome flattened beside them."""
        reply = {
            "v": PROTOCOL_VERSION,
            "command_id": command["command_id"],
            "saga_id": command["saga_id"],
            "step_index": command["step_index"],
            "step": command["step"],
            "direction": command["direction"],
            "attempt": command["attempt"],
            "worker": self.id,
        }
        reply.update(outcome)
        return reply

    def process_span(self, msg, command, received):
        """Section 16 (tracing): the span of serving `msg`, from its receipt to its ack, in the
        trace the command names; None for a command without a saga id."""
        if not isinstance(command, dict) or not is_uuid(command.get("saga_id")):
            return None
        attributes = messaging_attributes("process", msg.subject, header(msg.headers, MSG_ID))
        attributes.update(saga_attributes(command, self.id))
        context = incoming_context(msg.headers, command["saga_id"])
        return Span(self.exporter, context, f"process {msg.subject}", SPAN_KIND_CONSUMER, attributes, received)

    @staticmethod
    def send_span(parent, reply_to, message_id):
        """Section 16 (tracing): the span of publishing a reply, a child of the process span."""
        if parent is None:
            return None
        # Only the message's attributes: the saga, step, attempt and node are the parent's.
        attributes = messaging_attributes("send", reply_to, message_id)
        return parent.child(f"send {reply_to}", SPAN_KIND_PRODUCER, attributes)

    async def publish_reply(self, reply_to, epoch, reply, span=None):
        """Sections 3, 6 and 10 step 7: a JetStream publish on the command's `reply_to`, opaque
        and unchanged, with Nats-Msg-Id `reply:{command_id}@{epoch}`, waiting for the ack.
        Section 16 (tracing): under the process `span`, with the send span's `traceparent`."""
        payload = json.dumps(reply, separators=(",", ":")).encode()
        if len(payload) > MAX_MESSAGE_BYTES:
            raise ValueError(f"reply of {len(payload)} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
        message_id = reply_message_id(reply["command_id"], epoch)
        headers = {MSG_ID: message_id}
        send = self.send_span(span, reply_to, message_id)
        if send is not None:
            headers.update(send.trace_headers())
        try:
            ack = await self.js.publish(reply_to, payload, timeout=5, headers=headers)
        except Exception as e:
            if send is not None:
                send.fail(f"the reply was not stored: {e!r}")
            raise
        finally:
            if send is not None:
                send.finish()
        if ack.duplicate:
            log.info("reply to %s was already stored", reply["command_id"])

    async def serve(self, msg):
        received = time.time_ns()
        command, problem = parse_command(msg.data)
        span = self.process_span(msg, command, received)
        try:
            if problem is not None:
                await self.refuse(msg, command, problem, span)
            else:
                await self.answer(msg, command, span)
        finally:
            if span is not None:
                span.finish()

    async def refuse(self, msg, command, problem, span):
        """Section 10 step 1: a malformed command is answered if it names its attempt, and
        terminated."""
        log.warning("malformed command on %s dropped: %s", msg.subject, problem)
        if names_its_attempt(command):
            outcome = failed("permanent", "malformed_command", f"the command does not match the protocol: {problem}")
            record_outcome(span, outcome)
            try:
                await self.publish_reply(command["reply_to"], epoch_of(command), self.reply_to(command, outcome), span)
            except Exception as e:
                log.warning("could not answer the malformed command: %r", e)
        elif span is not None:
            span.fail(f"malformed command dropped unanswered: {problem}")
        await msg.term()

    def outcome_of(self, command):
        """Steps 2-3: version, saga, step. Step 4: the epoch. Steps 5-6: the record, or the
        handler. Raises StoreUnavailable when the worker's database cannot answer."""
        if command["v"] != PROTOCOL_VERSION:
            log.warning("command %s has schema version %s", command["command_id"], command["v"])
            return failed(
                "permanent",
                "unsupported_version",
                f"command schema version {command['v']} is not supported by this worker (it speaks {PROTOCOL_VERSION})",
            )
        if command["saga"] != SAGA or command["saga_version"] != SAGA_VERSION:
            return failed(
                "permanent",
                "unknown_saga",
                f"this worker serves no saga `{command['saga']}` version {command['saga_version']}",
            )
        if (
            command["step_index"] >= len(SPEC["steps"])
            or SPEC["steps"][command["step_index"]]["name"] != command["step"]
            or (command["step"], command["direction"]) not in HANDLERS
        ):
            return failed(
                "permanent",
                "unknown_step",
                f"saga `{SAGA}` v{SAGA_VERSION} has no step `{command['step']}` ({command['direction']}) at position {command['step_index']}",
            )
        highest = self.ledger.check_epoch(command["partition"], command["epoch"])
        if command["epoch"] < highest:
            # Rule 9.7: the sender lost the partition. Neither the record nor the handler is
            # looked at: the reply says nothing about the step.
            log.warning(
                "command %s of partition %s has epoch %s, superseded by %s: refused",
                command["command_id"], command["partition"], command["epoch"], highest,
            )
            return failed(
                "permanent",
                "stale_epoch",
                f"partition {command['partition']}: epoch {command['epoch']} was superseded by "
                f"epoch {highest}; the engine node that sent this command no longer owns the "
                "saga, nothing was run",
            )
        handler = HANDLERS[(command["step"], command["direction"])]
        try:
            command = self.keys.opened(command)
        except SecretUnreadable as e:
            return failed("permanent", "secret_unreadable", str(e))
        secret_output = SPEC["steps"][command["step_index"]].get("secret_output", [])
        if command["direction"] == "forward" and secret_output:
            handler = self.keys.sealing(handler, secret_output)
        return self.ledger.answer(command, handler)

    async def answer(self, msg, command, span):
        try:
            outcome = self.outcome_of(command)
        except StoreUnavailable as e:
            log.warning("worker database unavailable (%s); command %s retried later", e, command["command_id"])
            await msg.nak(delay=1.0)
            return
        record_outcome(span, outcome)

        # Step 7: reply where the command says, wait for JetStream to store it, then ack.
        reply = self.reply_to(command, outcome)
        try:
            await self.publish_reply(command["reply_to"], command["epoch"], reply, span)
        except Exception as e:
            log.warning("reply to %s not stored (%r); the command will be redelivered", command["command_id"], e)
            try:
                await msg.nak(delay=0.5)
            except Exception:
                pass
            return
        try:
            await msg.ack_sync(timeout=5)
        except Exception as e:
            log.warning("ack of %s failed (%r); it will be redelivered and answered from the record", command["command_id"], e)
        log.info("%s %s/%s attempt %s -> %s", command["saga_id"], command["step"], command["direction"], command["attempt"], outcome["status"])


async def ensure_streams(js):
    """Section 4: create the streams only if they are missing; never change them."""
    for name, subject in ((COMMAND_STREAM, "sagaflow.cmd.>"), (REPLY_STREAM, "sagaflow.reply.>")):
        try:
            await js.stream_info(name)
            continue
        except nats.js.errors.NotFoundError:
            pass
        config = StreamConfig(
            name=name,
            subjects=[subject],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            max_msg_size=MAX_MESSAGE_BYTES,
            duplicate_window=DUPLICATE_WINDOW_SECONDS,
            num_replicas=1,
            discard=DiscardPolicy.OLD,
            max_msgs=-1,
            max_bytes=-1,
            max_age=0,
        )
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError:
            # Someone else created it in the meantime.
            await js.stream_info(name)


async def ensure_consumer(js, saga):
    """Section 5: the shared durable pull consumer of the saga, created only if missing."""
    durable = worker_consumer(saga)
    try:
        await js.consumer_info(COMMAND_STREAM, durable)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_consumer(
                COMMAND_STREAM,
                ConsumerConfig(
                    durable_name=durable,
                    filter_subject=command_subject_filter(saga),
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=ACK_WAIT_SECONDS,
                    max_deliver=MAX_DELIVER,
                    deliver_policy=DeliverPolicy.ALL,
                ),
            )
        except nats.js.errors.BadRequestError:
            await js.consumer_info(COMMAND_STREAM, durable)
    return await js.pull_subscribe_bind(durable=durable, stream=COMMAND_STREAM)


async def announce(nc, once):
    """Section 15: register until an engine answers ok; `once` returns after the first ok."""
    request = json.dumps({"v": PROTOCOL_VERSION, "sagas": [SPEC]}).encode()
    while True:
        try:
            msg = await nc.request(REGISTER_SUBJECT, request, timeout=5)
            answer = json.loads(msg.data)
            if answer.get("status") == "ok":
                if once:
                    return
                await asyncio.sleep(60)
                continue
            log.error("an engine refused this worker's definition: %s", answer)
            await asyncio.sleep(60 if not once else 2)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError, asyncio.TimeoutError) as e:
            log.info("no engine answered the registration yet (%r); trying again", e)
            await asyncio.sleep(1)


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--db", default="py_transfer_worker.db", help="the worker's SQLite file")
    parser.add_argument("--id", default=f"py-worker-{os.getpid()}", help="names this worker in the histories")
    parser.add_argument("--batch", type=int, default=32, help="commands pulled and served at once")
    parser.add_argument("--secret-keys", help="key file of secret fields (section 17)")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {args.id} %(levelname)s %(message)s",
    )

    keys = SecretKeys.load(args.secret_keys)
    if not keys.keys:
        # Like the SDK's worker: refuse to start rather than fail every command (section 17).
        sys.exit(f"saga {SAGA} has secret fields (input.reference, output.credit.receipt) and this "
                 "worker has no keys to open and seal them; give --secret-keys FILE or set "
                 "SAGAFLOW_SECRET_KEYS_FILE or SAGAFLOW_SECRET_KEYS")
    ledger = Ledger(args.db)
    nc = await nats.connect(args.nats_url, name=args.id, max_reconnect_attempts=-1)
    js = nc.jetstream()
    await ensure_streams(js)
    subscription = await ensure_consumer(js, SAGA)
    await announce(nc, once=True)
    reannounce = asyncio.create_task(announce(nc, once=False))
    exporter = SpanExporter.from_env()
    exporter.start()
    worker = Worker(nc, js, ledger, args.id, exporter, keys)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    print(f"READY {args.id}", flush=True)
    log.info("serving %s on %s", SAGA, args.nats_url)
    while not stop.is_set():
        try:
            messages = await subscription.fetch(batch=args.batch, timeout=1)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            continue
        except Exception as e:
            log.warning("pulling commands failed (%r); retrying", e)
            await asyncio.sleep(0.2)
            continue
        # Each serve() does its SQLite work without awaiting in between, so they can overlap.
        results = await asyncio.gather(*(worker.serve(m) for m in messages), return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.error("serving a command failed: %r", result)

    log.info("stopping")
    reannounce.cancel()
    try:
        await nc.drain()
    finally:
        # Section 16 (tracing): the spans of the last commands served leave before the process.
        await exporter.close()


if __name__ == "__main__":
    asyncio.run(main())
