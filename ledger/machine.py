"""The ledger state machine: apply a request to state, deterministically.

`execute` turns a request into an outcome (a log entry, or a rejection) against a read
view of the state, writing the new state into an `Overlay`. `project_entry` is the single
place where a log entry changes state: `execute` calls it for what it commits, and recovery
calls it for entries read back from the committed log, so a store rebuilt from the log is
identical to the one built live.

No I/O, no clock: `now` is an argument, and ids come from the ledger's head in the state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ledger import hashchain
from ledger.commands import (
    parse_script,
    CreateLedger,
    CreateTransaction,
    DeleteMetadata,
    Request,
    RevertTransaction,
    SaveMetadata,
)
from ledger.errors import (
    InterpreterRuntime,
    MetadataOverride,
    AlreadyReverted,
    Conflict,
    NotFound,
    InsufficientFunds,
    LedgerAlreadyExists,
    LedgerError,
    LedgerNotFound,
    ValidationError,
)
from ledger.model import (
    CREATED_LEDGER,
    DELETE_METADATA,
    NEW_TRANSACTION,
    REVERTED_TRANSACTION,
    SET_METADATA,
    TARGET_ACCOUNT,
    WORLD,
    LogEntry,
    Posting,
    Transaction,
    Volumes,
    volumes_json,
)
from ledger.state import (
    EFFECTIVE,
    effective_moment,
    ACCOUNT,
    HEAD,
    IDEMPOTENCY,
    LEDGER,
    LOG,
    REFERENCE,
    REQUEST,
    TRANSACTION,
    VOLUMES,
    AccountRecord,
    Head,
    IdempotencyRecord,
    LedgerInfo,
    Overlay,
    RequestRecord,
)
from ledger.timeutil import format_rfc3339, parse_rfc3339


@dataclass(frozen=True, slots=True)
class Committed:
    request_id: str
    entry: LogEntry
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class Rejected:
    request_id: str
    ledger: str
    code: str
    message: str
    details: dict
    date: int
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class Replayed:
    """A request already answered: a redelivery (same request id) or an idempotency hit.

    `original` is the record of the first outcome; the caller re-publishes it.
    """

    request_id: str
    ledger: str
    original: RequestRecord
    idempotency_hit: bool


Outcome = Committed | Rejected | Replayed


def execute(
    state: Overlay, request: Request, now: int, numscript_flags: frozenset[str] = frozenset()
) -> Outcome:
    """Apply one request, writing its effects into `state`.

    Every check that can refuse a request runs before the first write (deciders raise,
    then `project_entry` writes), so a rejection leaves `state` untouched without a
    per-request overlay. A dry run writes into a throwaway overlay instead.

    `numscript_flags` are the experimental Numscript features the server enables for
    every script (a script may also enable them itself with `#![feature("…")]`).
    """
    previous = state.get((REQUEST, request.request_id))
    if previous is not None:
        return Replayed(request.request_id, request.ledger, previous, idempotency_hit=False)
    target = Overlay(state) if request.dry_run else state
    writes_before = target.write_count()
    try:
        replay = _check_idempotency(target, request)
        if replay is not None:
            return replay
        entry = _decide(target, request, now, numscript_flags)
    except LedgerError as error:
        assert target.write_count() == writes_before, "a request was refused after it wrote"
        rejection = Rejected(
            request.request_id, request.ledger, error.code, error.message,
            _jsonable(error.details), now, request.dry_run,
        )
        if not request.dry_run:
            project_rejection(state, rejection)
        return rejection
    return Committed(request.request_id, entry, request.dry_run)


def refuse(state: Overlay, rejection: Rejected) -> Rejected | Replayed:
    """Record a refusal decided before `execute` could run (a record that is not a request,
    a field out of range). Like `execute`, a request id already answered is not answered
    twice: its redelivery replays the first outcome."""
    previous = state.get((REQUEST, rejection.request_id))
    if previous is not None:
        return Replayed(rejection.request_id, rejection.ledger, previous, idempotency_hit=False)  # type: ignore[arg-type]
    project_rejection(state, rejection)
    return rejection


def _check_idempotency(state: Overlay, request: Request) -> Replayed | None:
    if not request.idempotency_key:
        return None
    record = state.get((IDEMPOTENCY, request.ledger, request.idempotency_key))
    if record is None:
        return None
    assert isinstance(record, IdempotencyRecord)
    if record.input_hash != request.idempotency_hash:
        raise ValidationError(
            f"idempotency key '{request.idempotency_key}' was already used with a different input"
        )
    original = state.get((REQUEST, record.request_id))
    assert isinstance(original, RequestRecord), "an idempotency key always names an applied request"
    return Replayed(request.request_id, request.ledger, original, idempotency_hit=True)


def _decide(state: Overlay, request: Request, now: int, numscript_flags: frozenset[str]) -> LogEntry:
    command = request.command
    if isinstance(command, CreateLedger):
        return _create_ledger(state, request, command, now)
    if state.get((LEDGER, request.ledger)) is None:
        raise LedgerNotFound(f"ledger '{request.ledger}' does not exist: create it first")
    if isinstance(command, CreateTransaction):
        return _create_transaction(state, request, command, now, numscript_flags)
    if isinstance(command, RevertTransaction):
        return _revert_transaction(state, request, command, now)
    if isinstance(command, SaveMetadata):
        return _save_metadata(state, request, command, now)
    if isinstance(command, DeleteMetadata):
        return _delete_metadata(state, request, command, now)
    raise ValidationError(f"unsupported command {type(command).__name__}")


def _create_ledger(state: Overlay, request: Request, command: CreateLedger, now: int) -> LogEntry:
    if state.get((LEDGER, request.ledger)) is not None:
        raise LedgerAlreadyExists(f"ledger '{request.ledger}' already exists")
    data = {
        "name": request.ledger,
        "bucket": command.bucket,
        "metadata": dict(command.metadata),
        "features": dict(command.features),
        "addedAt": format_rfc3339(now),
    }
    entry = LogEntry(
        ledger=request.ledger, id=0, type=CREATED_LEDGER, data=data, date=now,
        idempotency_key=request.idempotency_key, idempotency_hash=request.idempotency_hash,
        hash=b"", request_id=request.request_id,
    )
    project_entry(state, entry)
    return entry


def _create_transaction(
    state: Overlay, request: Request, command: CreateTransaction, now: int,
    numscript_flags: frozenset[str],
) -> LogEntry:
    if command.reference and state.get((REFERENCE, request.ledger, command.reference)) is not None:
        raise Conflict(f"transaction reference '{command.reference}' already exists")
    metadata = dict(command.metadata)
    account_metadata = {address: dict(values) for address, values in command.account_metadata.items()}
    if command.script is not None:
        result = _run_script(state, request.ledger, command, numscript_flags)
        postings = result.postings
        overridden = sorted(set(metadata) & set(result.tx_metadata))
        if overridden:
            raise MetadataOverride(
                f"metadata {overridden} set by the request would override the script's set_tx_meta"
            )
        metadata = {**result.tx_metadata, **metadata}
        for address, values in result.account_metadata.items():
            account_metadata[address] = {**values, **account_metadata.get(address, {})}
    else:
        postings = list(command.postings or ())
        if not command.force:
            _check_funds(state, request.ledger, postings)
    head = _head(state, request.ledger)
    date = max(now, head.last_date)
    transaction = _transaction_payload(
        head.last_transaction_id + 1, postings, metadata,
        command.timestamp if command.timestamp is not None else date, command.reference,
    )
    data = {"transaction": transaction, "accountMetadata": account_metadata}
    return _chain_entry(state, request, head, NEW_TRANSACTION, data, date)


class _ScriptStore:
    """What a Numscript program may read: current balances and account metadata."""

    __slots__ = ("state", "ledger")

    def __init__(self, state: Overlay, ledger: str) -> None:
        self.state = state
        self.ledger = ledger

    def get_balances(self, query: dict[str, set[str]]) -> dict[str, dict[str, int]]:
        answer: dict[str, dict[str, int]] = {}
        for account, assets in query.items():
            row = answer.setdefault(account, {})
            for asset in assets:
                if asset.endswith("/*"):  # every scale of an asset (experimental-asset-scaling)
                    row.update(self._scales(account, asset[:-2]))
                else:
                    row[asset] = _volumes(self.state, self.ledger, account, asset).balance
        return answer

    def _scales(self, account: str, base: str) -> dict[str, int]:
        held = {}
        for asset, volumes in self.state.scan((VOLUMES, self.ledger, account)):
            if asset == base or asset.startswith(base + "/"):
                held[asset] = volumes.balance  # type: ignore[union-attr]
        return held

    def get_account_metadata(self, account: str) -> dict[str, str]:
        record = self.state.get((ACCOUNT, self.ledger, account))
        return dict(record.metadata) if record is not None else {}  # type: ignore[union-attr]


def _run_script(state: Overlay, ledger: str, command: CreateTransaction, flags: frozenset[str]):
    from ledger import numscript

    assert command.script is not None
    program = parse_script(command.script.plain)
    try:
        result = numscript.execute(program, command.script.vars, _ScriptStore(state, ledger), flags)
    except LedgerError:
        raise
    except (ArithmeticError, LookupError, RecursionError, TypeError, ValueError) as error:
        # A program is user input: whatever it makes the interpreter trip on must be this
        # request's rejection, not a crash loop of the partition (a poison pill).
        raise InterpreterRuntime(f"the script failed: {type(error).__name__}: {error}") from None
    postings = [Posting(p.source, p.destination, p.amount, p.asset) for p in result.postings]
    for posting in postings:  # the interpreter's own post-check, restated at the boundary
        assert posting.amount >= 0, posting
    return _ScriptResult(postings, dict(result.tx_metadata), dict(result.account_metadata))


@dataclass(frozen=True, slots=True)
class _ScriptResult:
    postings: list[Posting]
    tx_metadata: dict[str, str]
    account_metadata: dict[str, dict[str, str]]


REVERTS_METADATA_KEY = "com.formance.spec/state/reverts"
# Formance's per-ledger feature: SYNC (default) keeps effective volumes, DISABLED does not.
EFFECTIVE_VOLUMES_FEATURE = "MOVES_HISTORY_POST_COMMIT_EFFECTIVE_VOLUMES"


def _revert_transaction(
    state: Overlay, request: Request, command: RevertTransaction, now: int
) -> LogEntry:
    """Formance's revert: the reverse postings in reverse order, checked for funds unless
    `force` (the money may have moved on), marking the original as reverted."""
    ledger = request.ledger
    original = state.get((TRANSACTION, ledger, command.transaction_id))
    if original is None:
        raise NotFound(f"transaction {command.transaction_id} not found")
    assert isinstance(original, Transaction)
    if original.reverted:
        raise AlreadyReverted(f"transaction {command.transaction_id} is already reverted")
    postings = [
        Posting(p.destination, p.source, p.amount, p.asset) for p in reversed(original.postings)
    ]
    if not command.force:
        _check_funds(state, ledger, postings)
    head = _head(state, ledger)
    date = max(now, head.last_date)
    metadata = {**command.metadata, REVERTS_METADATA_KEY: str(original.id)}
    timestamp = original.timestamp if command.at_effective_date else date
    transaction = _transaction_payload(head.last_transaction_id + 1, postings, metadata, timestamp, None)
    reverted_view = _transaction_payload(
        original.id, original.postings, original.metadata, original.timestamp, original.reference,
    )
    reverted_view["reverted"] = True
    reverted_view["revertedAt"] = format_rfc3339(date)
    data = {
        "revertedTransactionID": original.id,
        "revertedTransaction": reverted_view,
        "transaction": transaction,
    }
    return _chain_entry(state, request, head, REVERTED_TRANSACTION, data, date)


def _transaction_payload(
    transaction_id: int, postings: list[Posting], metadata: dict[str, str], timestamp: int,
    reference: str | None,
) -> dict:
    """A transaction as Formance's log data carries it (the hash takes its memento)."""
    payload = {
        "postings": [posting.to_json() for posting in postings],
        "metadata": dict(metadata),
        "timestamp": format_rfc3339(timestamp),
        "id": transaction_id,
        "reverted": False,
    }
    if reference:
        payload["reference"] = reference
    return payload


def _save_metadata(state: Overlay, request: Request, command: SaveMetadata, now: int) -> LogEntry:
    _check_metadata_target(state, request.ledger, command.target_type, command.target_id)
    head = _head(state, request.ledger)
    data = {
        "targetType": command.target_type,
        "targetId": command.target_id,
        "metadata": dict(command.metadata),
    }
    return _chain_entry(state, request, head, SET_METADATA, data, max(now, head.last_date))


def _delete_metadata(state: Overlay, request: Request, command: DeleteMetadata, now: int) -> LogEntry:
    current = _check_metadata_target(state, request.ledger, command.target_type, command.target_id)
    if command.target_type != TARGET_ACCOUNT and command.key not in current:
        raise NotFound(f"transaction {command.target_id} has no metadata key '{command.key}'")
    head = _head(state, request.ledger)
    data = {"targetType": command.target_type, "targetId": command.target_id, "key": command.key}
    return _chain_entry(state, request, head, DELETE_METADATA, data, max(now, head.last_date))


def _check_metadata_target(state: Overlay, ledger: str, target_type: str, target_id) -> dict[str, str]:
    """The target's current metadata; a transaction must exist, an account need not."""
    if target_type == TARGET_ACCOUNT:
        record = state.get((ACCOUNT, ledger, target_id))
        return record.metadata if record is not None else {}  # type: ignore[union-attr]
    transaction = state.get((TRANSACTION, ledger, target_id))
    if transaction is None:
        raise NotFound(f"transaction {target_id} not found")
    return transaction.metadata  # type: ignore[union-attr]


def _check_funds(state: Overlay, ledger: str, postings: list[Posting]) -> None:
    """Each posting is a `send` from a bounded source, checked in order (Formance compiles
    raw postings to one Numscript `send` each, with balances tracked across them)."""
    balances: dict[tuple[str, str], int] = {}
    for posting in postings:
        for account in (posting.source, posting.destination):
            key = (account, posting.asset)
            if key not in balances:
                balances[key] = _volumes(state, ledger, account, posting.asset).balance
        source_key = (posting.source, posting.asset)
        available = balances[source_key]
        if posting.source != WORLD and available < posting.amount:
            raise InsufficientFunds(posting.source, posting.asset, posting.amount, max(available, 0))
        balances[source_key] -= posting.amount
        balances[(posting.destination, posting.asset)] += posting.amount


def _chain_entry(
    state: Overlay, request: Request, head: Head, log_type: str, data: dict, date: int
) -> LogEntry:
    memento = hashchain.memento_of(log_type, data)
    line = hashchain.entry_line(log_type, memento, date, request.idempotency_key)
    entry = LogEntry(
        ledger=request.ledger, id=head.last_log_id + 1, type=log_type, data=data, date=date,
        idempotency_key=request.idempotency_key, idempotency_hash=request.idempotency_hash,
        hash=hashchain.chain(head.last_hash, line), request_id=request.request_id,
    )
    project_entry(state, entry)
    return entry


def project_rejection(state: Overlay, rejection: Rejected) -> None:
    state.put(
        (REQUEST, rejection.request_id),
        RequestRecord(
            ledger=rejection.ledger, code=rejection.code, message=rejection.message,
            details=rejection.details, date=rejection.date,
        ),
    )


def project_entry(state: Overlay, entry: LogEntry) -> None:
    """Make `entry`'s effects on state. Deterministic in `entry` and the prior state."""
    ledger = entry.ledger
    if entry.type == CREATED_LEDGER:
        data = entry.data
        state.put((LEDGER, ledger), LedgerInfo(
            name=ledger, added_at=entry.date, bucket=data.get("bucket", "_default"),
            metadata=dict(data.get("metadata") or {}), features=dict(data.get("features") or {}),
        ))
    elif entry.type == NEW_TRANSACTION:
        _project_transaction(state, entry, entry.data["transaction"], entry.data.get("accountMetadata"))
    elif entry.type == REVERTED_TRANSACTION:
        _project_transaction(state, entry, entry.data["transaction"], None)
        _mark_reverted(state, ledger, entry.data["revertedTransactionID"], entry.date)
    elif entry.type == SET_METADATA:
        _project_metadata(state, entry, entry.data["metadata"], None)
    elif entry.type == DELETE_METADATA:
        _project_metadata(state, entry, None, entry.data["key"])
    else:
        raise AssertionError(f"unknown log entry type {entry.type}")
    state.put((REQUEST, entry.request_id), RequestRecord(ledger=ledger, log_id=entry.id, date=entry.date))
    if entry.idempotency_key:
        state.put(
            (IDEMPOTENCY, ledger, entry.idempotency_key),
            IdempotencyRecord(entry.idempotency_hash, entry.request_id),
        )
    if entry.id > 0:
        head = _head(state, ledger)
        assert entry.id == head.last_log_id + 1, f"log gap in {ledger}: {head.last_log_id} -> {entry.id}"
        transaction_id, max_timestamp = head.last_transaction_id, head.max_timestamp
        if entry.type in (NEW_TRANSACTION, REVERTED_TRANSACTION):
            transaction_id = entry.data["transaction"]["id"]
            timestamp = parse_rfc3339(entry.data["transaction"]["timestamp"])
            max_timestamp = timestamp if max_timestamp is None else max(max_timestamp, timestamp)
        state.put((HEAD, ledger), Head(
            entry.id, entry.hash, transaction_id, max(entry.date, head.last_date), max_timestamp))
    state.put((LOG, ledger, entry.id), entry)


def _project_transaction(state: Overlay, entry: LogEntry, raw: dict, account_metadata: dict | None) -> None:
    ledger = entry.ledger
    postings = [Posting(p["source"], p["destination"], p["amount"], p["asset"]) for p in raw["postings"]]
    timestamp = parse_rfc3339(raw["timestamp"])
    post_commit: dict[str, dict[str, Volumes]] = {}
    for posting in postings:
        for account, is_source in ((posting.source, True), (posting.destination, False)):
            current = post_commit.get(account, {}).get(posting.asset)
            if current is None:
                current = _volumes(state, ledger, account, posting.asset)
            if is_source:
                current = Volumes(current.input, current.output + posting.amount)
            else:
                current = Volumes(current.input + posting.amount, current.output)
            post_commit.setdefault(account, {})[posting.asset] = current
    for account, by_asset in post_commit.items():
        for asset, volumes in by_asset.items():
            state.put((VOLUMES, ledger, account, asset), volumes)
        _touch_account(state, ledger, account, timestamp, entry.date, None)
    for address, metadata in (account_metadata or {}).items():
        _touch_account(state, ledger, address, timestamp, entry.date, metadata)
    transaction = Transaction(
        id=raw["id"], postings=postings, metadata=dict(raw.get("metadata") or {}),
        timestamp=timestamp, inserted_at=entry.date, reference=raw.get("reference"),
        updated_at=entry.date, post_commit_volumes=post_commit,
    )
    state.put((TRANSACTION, ledger, transaction.id), transaction)
    if transaction.reference:
        state.put((REFERENCE, ledger, transaction.reference), transaction.id)
    raw["postCommitVolumes"] = volumes_json(post_commit)
    raw["insertedAt"] = format_rfc3339(entry.date)
    if _effective_volumes_enabled(state, ledger):
        effective = _project_effective(state, ledger, transaction, post_commit)
        # Not back-dated (the common case): the same volumes, rendered once.
        raw["postCommitEffectiveVolumes"] = (
            raw["postCommitVolumes"] if effective is post_commit else volumes_json(effective))


def _effective_volumes_enabled(state: Overlay, ledger: str) -> bool:
    info = state.get((LEDGER, ledger))
    return info is None or info.features.get(EFFECTIVE_VOLUMES_FEATURE, "SYNC") != "DISABLED"  # type: ignore[union-attr]


def _project_effective(
    state: Overlay, ledger: str, transaction: Transaction, post_commit: dict[str, dict[str, Volumes]],
) -> dict[str, dict[str, Volumes]]:
    """Record this transaction's effective volumes per (account, asset) it moves.

    In effective-date order, a move's effective volumes are the sum of every move at or
    before it. A transaction at or after the ledger's latest timestamp is the last move of
    each of its accounts, so its effective volumes are its insertion volumes: one write
    each, no read. A back-dated one (Formance's bitemporality) is inserted between earlier
    and later moves: its volumes are the previous move's plus its own, and every later
    move of that account and asset grows by the same amounts — O(later moves), as in
    Formance's `update_effective_volumes` trigger.
    """
    head = _head(state, ledger)
    moment = effective_moment(transaction.timestamp, transaction.id)
    latest = head.max_timestamp is None or transaction.timestamp >= head.max_timestamp
    if latest:  # the last move of each of its accounts: its insertion volumes
        for account, by_asset in post_commit.items():
            for asset, volumes in by_asset.items():
                state.put((EFFECTIVE, ledger, account, asset, moment), volumes)
        return post_commit
    deltas: dict[tuple[str, str], list[int]] = {}
    for posting in transaction.postings:
        deltas.setdefault((posting.source, posting.asset), [0, 0])[1] += posting.amount
        deltas.setdefault((posting.destination, posting.asset), [0, 0])[0] += posting.amount
    effective: dict[str, dict[str, Volumes]] = {}
    for (account, asset), (input_delta, output_delta) in deltas.items():
        volumes = _insert_back_dated(state, (EFFECTIVE, ledger, account, asset), moment, input_delta, output_delta)
        state.put((EFFECTIVE, ledger, account, asset, moment), volumes)
        effective.setdefault(account, {})[asset] = volumes
    return effective


def _insert_back_dated(state: Overlay, prefix: tuple, moment: bytes, input_delta: int, output_delta: int) -> Volumes:
    previous = Volumes()
    for key, volumes in state.scan(prefix, moment, reverse=True):
        if key < moment:
            previous = volumes  # type: ignore[assignment]
            break
    for key, volumes in list(state.scan(prefix, moment)):
        if key > moment:
            state.put(prefix + (key,), Volumes(volumes.input + input_delta, volumes.output + output_delta))  # type: ignore[union-attr]
    return Volumes(previous.input + input_delta, previous.output + output_delta)


def _mark_reverted(state: Overlay, ledger: str, transaction_id: int, date: int) -> None:
    original = state.get((TRANSACTION, ledger, transaction_id))
    assert isinstance(original, Transaction), f"reverted transaction {transaction_id} missing"
    state.put((TRANSACTION, ledger, transaction_id), replace(original, reverted_at=date, updated_at=date))


def _project_metadata(state: Overlay, entry: LogEntry, metadata: dict | None, deleted_key: str | None) -> None:
    ledger, target = entry.ledger, entry.data["targetId"]
    if entry.data["targetType"] == TARGET_ACCOUNT:
        record = state.get((ACCOUNT, ledger, target))
        if record is None:  # Formance creates the account on a metadata write
            record = AccountRecord(target, {}, first_usage=entry.date, insertion_date=entry.date, updated_at=entry.date)
        assert isinstance(record, AccountRecord)
        values = dict(record.metadata)
        record = AccountRecord(record.address, values, record.first_usage, record.insertion_date, entry.date)
        key = (ACCOUNT, ledger, target)
    else:
        transaction = state.get((TRANSACTION, ledger, target))
        assert isinstance(transaction, Transaction), f"metadata target transaction {target} missing"
        values = dict(transaction.metadata)
        record = replace(transaction, metadata=values, updated_at=entry.date)
        key = (TRANSACTION, ledger, target)
    if metadata is not None:
        values.update(metadata)
    if deleted_key is not None:
        values.pop(deleted_key, None)
    state.put(key, record)


def _touch_account(
    state: Overlay, ledger: str, address: str, timestamp: int, date: int,
    metadata: dict[str, str] | None,
) -> None:
    """Create the account on first use; keep `firstUsage` the earliest effective date.

    An account already known, used at a later date, without new metadata, is not
    rewritten: `updatedAt` moves with the account's own changes (metadata), as in Formance.
    """
    record = state.get((ACCOUNT, ledger, address))
    if record is None:
        record = AccountRecord(address, {}, first_usage=timestamp, insertion_date=date, updated_at=date)
    else:
        assert isinstance(record, AccountRecord)
        if not metadata and record.first_usage <= timestamp:
            return
        record = AccountRecord(
            address, dict(record.metadata), min(record.first_usage, timestamp),
            record.insertion_date, date if metadata else record.updated_at,
        )
    if metadata:
        record.metadata.update(metadata)
    state.put((ACCOUNT, ledger, address), record)


def _head(state: Overlay, ledger: str) -> Head:
    head = state.get((HEAD, ledger))
    return head if head is not None else Head()  # type: ignore[return-value]


def _volumes(state: Overlay, ledger: str, account: str, asset: str) -> Volumes:
    volumes = state.get((VOLUMES, ledger, account, asset))
    return volumes if volumes is not None else Volumes()  # type: ignore[return-value]


def _jsonable(details: dict) -> dict:
    return {key: value for key, value in details.items() if isinstance(value, (str, int, bool, type(None)))}
