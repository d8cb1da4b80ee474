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

Run: python3 tests/python/transfer_worker.py --nats-url nats://127.0.0.1:4222 --db /tmp/w.db
It prints `READY <id>` on stdout once its consumer exists and an engine accepted its definition.
"""

import argparse
import asyncio
import json
import logging
import os
import signal
import sqlite3
import sys
import uuid

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


def step(name, kind, retry, compensation_retry, output_schema):
    return {
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


def object_schema(title, properties):
    """A JSON Schema (draft 2020-12) of an object with exactly these required properties."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": title,
        "type": "object",
        "properties": properties,
        "required": list(properties),
    }


# What read_transfer accepts: every step reads the whole saga input.
TRANSFER_SCHEMA = object_schema(
    "Transfer",
    {"from": {"type": "string"}, "to": {"type": "string"}, "amount": {"type": "integer", "minimum": 1}},
)
ACCOUNT = {"type": "string"}
INTEGER = {"type": "integer"}
MOVED_SCHEMA = object_schema("Moved", {"account": ACCOUNT, "amount": INTEGER, "balance": INTEGER})
FEE_SCHEMA = object_schema("FeeTaken", {"account": ACCOUNT, "fee": INTEGER, "balance": INTEGER})
NOTIFIED_SCHEMA = object_schema("Notified", {"notified": ACCOUNT})

SPEC = {
    "name": SAGA,
    "version": SAGA_VERSION,
    "deadline_ms": 60000,
    "steps": [
        step("debit", "compensatable", retry_policy(5), retry_policy(None), MOVED_SCHEMA),
        step("fee", "compensatable", retry_policy(5), retry_policy(None), FEE_SCHEMA),
        step("credit", "pivot", retry_policy(5, ["account_frozen"]), retry_policy(1, jitter=0.0), MOVED_SCHEMA),
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
    return succeeded({"account": target, "amount": amount, "balance": balance})


def notify(ledger, command):
    if command["attempt"] == 1:
        return failed("retryable", "mail_busy", "the mail relay is busy")
    transfer = read_transfer(command)
    if transfer is None:
        return bad_data(command)
    source, target, amount = transfer
    ledger.db.execute(
        "INSERT INTO notifications (idempotency_key, saga_id, text) VALUES (?, ?, ?)",
        (command["idempotency_key"], command["saga_id"], f"{source} sent {amount} to {target}"),
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


class Worker:
    def __init__(self, nc, js, ledger, worker_id):
        self.nc = nc
        self.js = js
        self.ledger = ledger
        self.id = worker_id

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

    async def publish_reply(self, reply_to, epoch, reply):
        """Sections 3, 6 and 10 step 7: a JetStream publish on the command's `reply_to`, opaque
        and unchanged, with Nats-Msg-Id `reply:{command_id}@{epoch}`, waiting for the ack."""
        payload = json.dumps(reply, separators=(",", ":")).encode()
        if len(payload) > MAX_MESSAGE_BYTES:
            raise ValueError(f"reply of {len(payload)} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
        ack = await self.js.publish(
            reply_to,
            payload,
            timeout=5,
            headers={"Nats-Msg-Id": reply_message_id(reply["command_id"], epoch)},
        )
        if ack.duplicate:
            log.info("reply to %s was already stored", reply["command_id"])

    async def serve(self, msg):
        # Step 1: parse.
        try:
            command = json.loads(msg.data)
            problem = schema_problem(command)
        except ValueError as e:
            command, problem = None, f"not JSON: {e}"
        if problem is not None:
            log.warning("malformed command on %s dropped: %s", msg.subject, problem)
            if names_its_attempt(command):
                reply = self.reply_to(
                    command,
                    failed("permanent", "malformed_command", f"the command does not match the protocol: {problem}"),
                )
                try:
                    await self.publish_reply(command["reply_to"], epoch_of(command), reply)
                except Exception as e:
                    log.warning("could not answer the malformed command: %r", e)
            await msg.term()
            return

        # Steps 2-3: version, saga, step. Step 4: the epoch. Steps 5-6: the record, or the handler.
        if command["v"] != PROTOCOL_VERSION:
            log.warning("command %s has schema version %s", command["command_id"], command["v"])
            outcome = failed(
                "permanent",
                "unsupported_version",
                f"command schema version {command['v']} is not supported by this worker (it speaks {PROTOCOL_VERSION})",
            )
        elif command["saga"] != SAGA or command["saga_version"] != SAGA_VERSION:
            outcome = failed(
                "permanent",
                "unknown_saga",
                f"this worker serves no saga `{command['saga']}` version {command['saga_version']}",
            )
        elif (
            command["step_index"] >= len(SPEC["steps"])
            or SPEC["steps"][command["step_index"]]["name"] != command["step"]
            or (command["step"], command["direction"]) not in HANDLERS
        ):
            outcome = failed(
                "permanent",
                "unknown_step",
                f"saga `{SAGA}` v{SAGA_VERSION} has no step `{command['step']}` ({command['direction']}) at position {command['step_index']}",
            )
        else:
            try:
                highest = self.ledger.check_epoch(command["partition"], command["epoch"])
                if command["epoch"] < highest:
                    # Rule 9.7: the sender lost the partition. Neither the record nor the
                    # handler is looked at: the reply says nothing about the step.
                    log.warning(
                        "command %s of partition %s has epoch %s, superseded by %s: refused",
                        command["command_id"], command["partition"], command["epoch"], highest,
                    )
                    outcome = failed(
                        "permanent",
                        "stale_epoch",
                        f"partition {command['partition']}: epoch {command['epoch']} was superseded by "
                        f"epoch {highest}; the engine node that sent this command no longer owns the "
                        "saga, nothing was run",
                    )
                else:
                    handler = HANDLERS[(command["step"], command["direction"])]
                    outcome = self.ledger.answer(command, handler)
            except StoreUnavailable as e:
                log.warning("worker database unavailable (%s); command %s retried later", e, command["command_id"])
                await msg.nak(delay=1.0)
                return

        # Step 7: reply where the command says, wait for JetStream to store it, then ack.
        reply = self.reply_to(command, outcome)
        try:
            await self.publish_reply(command["reply_to"], command["epoch"], reply)
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
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {args.id} %(levelname)s %(message)s",
    )

    ledger = Ledger(args.db)
    nc = await nats.connect(args.nats_url, name=args.id, max_reconnect_attempts=-1)
    js = nc.jetstream()
    await ensure_streams(js)
    subscription = await ensure_consumer(js, SAGA)
    await announce(nc, once=True)
    reannounce = asyncio.create_task(announce(nc, once=False))
    worker = Worker(nc, js, ledger, args.id)

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
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
