"""Fuzzing the receiver (issue 18, item 5): seeded, bounded, against one real node.

Malformed PDUs on raw sockets (lengths, truncation, random bytes, unknown types, thousands of
presentation contexts, P-DATA out of place, very long UIDs), malformed P-DATA inside established
associations, mutated data sets made from real files (tests/fuzz.py), and idle and half-open
connections against small pending and association limits. The invariants, checked after every
batch: the node keeps serving (DCMTK echoscu, the same receiver process, its threads given
back), nothing answered Success is lost (each one's exact bytes on disk and indexed), nothing
refused is left behind, nothing is written outside ``storage.path`` (the node runs in a sandbox:
its own working directory, HOME and TMPDIR), and the receiver's memory stays bounded.

The cases come from one seed (``FUZZ_SEED`` overrides it), printed in every failure
message: ``FUZZ_SEED=<seed> pytest tests/receiver/test_fuzz.py`` replays a failure.
Counts are fixed; nothing here measures wall-clock time.
"""

from __future__ import annotations

import hashlib
import random
import re
import socket
import struct
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE, _config
from sqlalchemy import create_engine, select

from node.index import Instance
from node.ingest.acceptor import COMMAND_MAX, PYNETDICOM_MESSAGE_MAX
from node.ingest.wire import file_meta
from tests import fuzz
from tests.helpers import NodeProcess, wait_for
from tests.receiver.conftest import settled, stored_files, storescu
from tests.receiver.test_stalled_peers import close_all, count_closed, stall, threads
from tests.receiver.test_wire_attacks import peak_rss, receiver_pid

SEED = fuzz.fuzz_seed()
ECHOSCU = "/usr/bin/echoscu"
CT = Path(get_testdata_file("CT_small.dcm"))
PDU_CASES = 240  # malformed connections before association
PDATA_CASES = 120  # malformed P-DATA inside established associations
MUTANTS = 108  # mutated data sets (9 per real file)
BATCH = 40
# Generous bounds: the receiver idles at about 100 MiB; none of this may add more than a little.
RSS_LIMIT = 500 * 1024 * 1024
RSS_GROWTH_LIMIT = 64 * 1024 * 1024
# Small limits make the slot tests cheap: 4 pending per address, 12 strangers pending, 4
# associations; ARTIM and the network timeout close the stalled ones within seconds.
CONFIG = {
    "node": {
        "artim_timeout_s": 3,
        "network_timeout_s": 3,
        "max_pending_per_address": 4,
        "max_pending_connections": 12,
        "max_associations": 4,
    }
}
ANSWER_TYPES = {
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}


def _seeded(what: str) -> str:
    return f"[FUZZ_SEED={SEED}] {what}"


# --- the node in its sandbox ----------------------------------------------------------------


class Watch:
    """The node under fuzzing, and what the test learned about it so far."""

    def __init__(self, node: NodeProcess, sandbox: Path):
        self.node, self.sandbox = node, sandbox
        self.pid = receiver_pid(node)
        serving(self, "at start")
        self.threads = threads(self.pid)
        self.rss: list[int] = [rss(self.pid)]

    def after_batch(self, what: str) -> None:
        """The invariants every batch must leave intact."""
        serving(self, what)
        assert wait_for(lambda: threads(self.pid) <= self.threads, 60), _seeded(
            f"after {what}: receiver threads {threads(self.pid)}, {self.threads} at start"
        )
        self.rss.append(rss(self.pid))
        peak = peak_rss(self.pid)
        assert peak < RSS_LIMIT, _seeded(f"after {what}: receiver peak RSS {peak >> 20} MiB")
        leaked = unhandled_exceptions(self.node.log_text())
        assert not leaked, _seeded(f"after {what}: exceptions nobody handled:\n" + "\n".join(leaked))


def unhandled_exceptions(log: str) -> list[str]:
    """Uncaught exceptions, and tracebacks logged by anything but pynetdicom: pynetdicom logs
    one (values withheld by the node's log filter) for each malformed value or message it
    refuses, and goes on; any other traceback is an exception ainode did not handle."""
    found, record = [], ""
    for line in log.splitlines():
        if _RECORD.match(line):
            record = line
            if " uncaught " in line:
                found.append(line)
        elif line.startswith("Traceback") and " pynetdicom." not in record and record not in found:
            found.append(record)
    return found


_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ")


def rss(pid: int) -> int:
    """The process's resident set now (VmRSS), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def serving(watch: Watch, what: str) -> None:
    """DCMTK echoscu gets its C-ECHO answered, by the same receiver process."""
    node = watch.node
    cmd = [ECHOSCU, "-v", "-aet", "ECHOSCU", "-aec", node.ae_title, "127.0.0.1", str(node.port)]
    echoed = subprocess.run(cmd, capture_output=True, text=True)
    assert echoed.returncode == 0 and "Received Echo Response (Success)" in echoed.stderr, _seeded(
        f"after {what}: C-ECHO failed: {echoed.stderr[-2000:]}"
    )
    assert receiver_pid(node) == watch.pid, _seeded(f"after {what}: the receiver process was replaced")


@pytest.fixture(scope="module")
def watch(tmp_path_factory):
    """One node for the module, in a sandbox: its working directory, HOME and TMPDIR are
    folders of the sandbox, so whatever it writes outside its configured paths shows there."""
    sandbox = tmp_path_factory.mktemp("fuzz-sandbox")
    folders = {name: sandbox / name for name in ("cwd", "home", "tmp")}
    for folder in folders.values():
        folder.mkdir()
    env = {"HOME": str(folders["home"]), "TMPDIR": str(folders["tmp"])}
    with NodeProcess(sandbox / "node", CONFIG, env=env, cwd=folders["cwd"]) as node:
        yield Watch(node, sandbox)


# --- raw connections ------------------------------------------------------------------------


def recv_until_closed(sock: socket.socket, limit: int = 1 << 22) -> bytes:
    """What the node sends until it closes the connection (a hang fails the test)."""
    sock.settimeout(60)
    data = b""
    while len(data) < limit:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            break
        except TimeoutError:
            raise AssertionError(_seeded("the node neither answered nor closed the connection")) from None
        if not chunk:
            break
        data += chunk
    return data


def whole_pdus(data: bytes) -> bool:
    """Whether ``data`` is a sequence of complete PDUs (as their length fields say)."""
    pos = 0
    while pos + 6 <= len(data):
        pos += 6 + struct.unpack_from(">I", data, pos + 2)[0]
    return pos == len(data) > 0


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a new connection and read everything until the node closes it.

    Whole PDUs get the node's first answer before our side is closed (the node would otherwise
    see the end of the stream before it answers); anything else is followed by the end of the
    stream at once (the node would wait for the rest until ARTIM)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        first = b""
        try:
            sock.sendall(data)
            if whole_pdus(data):
                first = read_pdu(sock)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the node closed first (it refused what it read)
            pass
        return first + recv_until_closed(sock)


def read_pdu(sock: socket.socket) -> bytes:
    """One whole PDU from the node (less when it closes the connection first)."""
    sock.settimeout(60)
    head = b""
    while len(head) < 6:
        try:
            chunk = sock.recv(6 - len(head))
        except ConnectionResetError:
            return head
        if not chunk:
            return head
        head += chunk
    length = struct.unpack(">I", head[2:])[0]
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    return head + body


def answer_types(data: bytes) -> list[str]:
    """The PDU types in the node's answer stream (framing checked)."""
    kinds, pos = [], 0
    while pos < len(data):
        assert pos + 6 <= len(data), _seeded(f"the node sent a truncated PDU: {data[pos : pos + 16].hex()}")
        kind, length = data[pos], struct.unpack_from(">I", data, pos + 2)[0]
        assert kind in ANSWER_TYPES, _seeded(f"the node sent PDU type 0x{kind:02x}")
        if kind == 0x02:  # an A-ASSOCIATE-AC answers at most 128 presentation contexts
            results = _items(data[pos + 74 : pos + 6 + length], 0x21)
            assert len(results) <= 128, _seeded(f"A-ASSOCIATE-AC with {len(results)} presentation context results")
        kinds.append(ANSWER_TYPES[kind])
        pos += 6 + length
    assert pos == len(data), _seeded("the node's PDUs do not tile its answer")
    return kinds


# --- 1. malformed PDUs before association -----------------------------------------------------


def test_malformed_pdus_before_association(watch):
    rng = random.Random(f"{SEED}-pdus")
    cases = fuzz.pdu_cases(rng, PDU_CASES)
    answers: Counter[tuple[str, str]] = Counter()
    for start in range(0, len(cases), BATCH):
        for case in cases[start : start + BATCH]:
            kinds = answer_types(exchange(watch.node.port, case.data))
            answers[(case.kind.split("-")[0], kinds[0] if kinds else "closed")] += 1
        watch.after_batch(f"PDU cases {start}-{start + BATCH - 1}")
    print(f"\n[fuzz seed {SEED}] answers to {len(cases)} malformed connections: {dict(sorted(answers.items()))}")


def test_thousands_of_presentation_contexts_are_answered_within_bounds(watch):
    """An A-ASSOCIATE-RQ may carry at most 128 presentation contexts (odd IDs 1-255): 3000 are
    rejected or answered for at most 128, never one result per item proposed."""
    for count in (129, 3000):
        with socket.create_connection(("127.0.0.1", watch.node.port)) as sock:
            sock.sendall(fuzz.associate_rq(contexts=fuzz.many_contexts(count)))
            answer = read_pdu(sock)
        assert answer[:1] in (b"\x02", b"\x03", b"\x07") or answer == b"", _seeded(answer[:16].hex())
        if answer[:1] == b"\x02":  # accepted: count the presentation context results
            results = _items(answer[74:], 0x21)
            assert len(results) <= 128, _seeded(f"{count} contexts proposed: {len(results)} results answered")
    watch.after_batch("thousands of presentation contexts")


def _items(data: bytes, kind: int) -> list[bytes]:
    found, pos = [], 0
    while pos + 4 <= len(data):
        length = struct.unpack_from(">H", data, pos + 2)[0]
        if data[pos] == kind:
            found.append(data[pos + 4 : pos + 4 + length])
        pos += 4 + length
    return found


# --- 2. malformed P-DATA inside established associations -------------------------------------


def associated(port: int) -> socket.socket:
    """A raw connection on which the node accepted ECHOSCU's association (Verification on
    context 1, CT Image Storage on context 3). The node gives an association's slot back just
    after it closes the connection: a transient rejection is tried again for a while."""
    found: list[socket.socket] = []
    answers: list[bytes] = []

    def accepted() -> bool:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(fuzz.associate_rq())
        answers.append(read_pdu(sock))
        if answers[-1][:1] == b"\x02":
            found.append(sock)
            return True
        sock.close()
        return False

    assert wait_for(accepted, 30, 0.2), _seeded(f"association not accepted: {answers[-1][:16].hex()}")
    return found[0]


def test_malformed_pdata_inside_associations(watch):
    """Each case follows an accepted association; then a good C-ECHO and a release request.
    The node answers or aborts, and closes; nothing it reads is taken for a stored instance."""
    rng = random.Random(f"{SEED}-pdata")
    cases = fuzz.pdata_cases(rng, PDATA_CASES)
    tail = fuzz.p_data(fuzz.pdv(1, 0x03, fuzz.echo_command(7))) + fuzz.pdu(0x05, bytes(4))
    answers: Counter[tuple[str, str]] = Counter()
    for start in range(0, len(cases), BATCH):
        for case in cases[start : start + BATCH]:
            with associated(watch.node.port) as sock:
                try:
                    sock.sendall(case.data + tail)
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                kinds = answer_types(recv_until_closed(sock))
            answers[(case.kind, kinds[-1] if kinds else "closed")] += 1
        watch.after_batch(f"P-DATA cases {start}-{start + BATCH - 1}")
    indexed = _instances(watch.node)
    assert not set(indexed) & set(fuzz.PDATA_STORE_UIDS), _seeded("a malformed P-DATA stored an instance")
    _store_holds_only_the_indexed(watch.node, indexed)
    print(f"\n[fuzz seed {SEED}] last answers to {len(cases)} malformed P-DATA: {dict(sorted(answers.items()))}")


def test_command_set_pynetdicom_cannot_decode_gives_its_slot_back(watch):
    """Found by this fuzzing: a command set without a Command Field made pynetdicom raise in the
    DUL reactor; the association was aborted and its connection closed, but its slot was never
    given back (no connection-closed event), so max_associations such messages from a known
    peer locked every peer out until the node restarted."""
    no_command_field = fuzz.command((0x0110, struct.pack("<H", 1)))  # a Message ID, nothing else
    for _ in range(CONFIG["node"]["max_associations"] + 1):
        with associated(watch.node.port) as sock:
            sock.sendall(fuzz.p_data(fuzz.pdv(1, 0x03, no_command_field)))
            assert answer_types(recv_until_closed(sock)) == ["A-ABORT"]
    assert "exception in the DUL reactor, aborting the association: AttributeError" in watch.node.log_text()
    _legitimate_peers_served(watch.node)
    watch.after_batch("command sets pynetdicom cannot decode")


def test_command_fragments_without_end_are_aborted(watch):
    """Found by this fuzzing: command fragments that never say "last" were collected without a
    bound (300 MB of them took the receiver from 204 to 493 MiB). Past 64 KiB the association
    is aborted."""

    fragment = fuzz.p_data(fuzz.pdv(1, 0x01, bytes(40_000)))
    with associated(watch.node.port) as sock:
        try:
            sock.sendall(fragment * (COMMAND_MAX // 40_000 + 1))  # just over: all of it read
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # aborted while we were still sending
            pass
        assert answer_types(recv_until_closed(sock)) == ["A-ABORT"]
    assert f"longer than {COMMAND_MAX} bytes: association aborted" in watch.node.log_text()
    watch.after_batch("command fragments without end")


def test_a_c_store_the_fast_path_cannot_parse_is_bounded_too(watch):
    """Found by this fuzzing: a C-STORE whose command set the fast path cannot parse (here a
    SOP Instance UID that is not ASCII) went to pynetdicom, which held its whole data set in
    memory (200 MB of it: peak RSS 203 -> 398 MiB) before the receiver refused it. Past 16 MiB
    the association is aborted."""

    not_ascii = fuzz.store_command("1.2.3.4").replace(b"1.2.3.4\x00", b"1.2.3.\x80\x00")
    fragment = fuzz.p_data(fuzz.pdv(3, 0x00, bytes(1_000_000)))
    with associated(watch.node.port) as sock:
        try:
            sock.sendall(fuzz.p_data(fuzz.pdv(3, 0x03, not_ascii)))
            sock.sendall(fragment * (PYNETDICOM_MESSAGE_MAX // 1_000_000 + 1))  # just over: all of it read
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        assert answer_types(recv_until_closed(sock)) == ["A-ABORT"]
    assert f"for pynetdicom longer than {PYNETDICOM_MESSAGE_MAX} bytes" in watch.node.log_text()
    watch.after_batch("a C-STORE the fast path cannot parse")


def test_a_pdu_the_state_machine_does_not_expect_aborts_the_association(watch):
    """Found by this fuzzing: a second A-RELEASE-RQ right behind the first can reach the state
    machine while it awaits our release response (Evt12 in Sta8); pynetdicom raises
    InvalidEventError, which ended the DUL reactor's thread as an uncaught exception. Now the
    association is aborted like after any other exception in the reactor. (A race: of ten
    tries, several hit it on the machines measured.)"""
    for _ in range(10):
        with associated(watch.node.port) as sock:
            sock.sendall(fuzz.pdu(0x05, bytes(4)) * 2)
            sock.shutdown(socket.SHUT_WR)
            answer_types(recv_until_closed(sock))
    _legitimate_peers_served(watch.node)
    watch.after_batch("two release requests")


# --- 3. mutated data sets from real files ------------------------------------------------------


class Sender:
    """C-STOREs of encoded data sets exactly as given (pynetdicom streams the file's data set
    unparsed), on one association reopened whenever the node ended it."""

    def __init__(self, node: NodeProcess, contexts: set[tuple[str, str]]):

        self.node = node
        self.ae = AE(ae_title="PYNETDICOM")
        for sop_class, syntax in sorted(contexts):
            self.ae.add_requested_context(sop_class, [syntax])
        self.assoc = None

    def send(self, path: Path) -> int | None:
        """The status the node answered (None: no answer)."""

        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate("127.0.0.1", self.node.port, ae_title=self.node.ae_title)
            assert self.assoc.is_established, _seeded("association refused")
        previous, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
        try:
            status = self.assoc.send_c_store(path)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = previous
        return getattr(status, "Status", None)

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


def _instances(node: NodeProcess) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (path, sha256) of every indexed instance."""
    settled(node)
    engine = create_engine(node.database_url)
    with engine.connect() as conn:
        rows = conn.execute(select(Instance.sop_instance_uid, Instance.path, Instance.sha256)).all()
    engine.dispose()
    return {uid: (path, sha) for uid, path, sha in rows}


SUCCESS = 0x0000


def test_mutated_real_data_sets(watch, tmp_path):
    rng = random.Random(f"{SEED}-mutants")
    seeds = [fuzz.load_seed(Path(get_testdata_file(name))) for name in fuzz.SEED_FILES]
    sender = Sender(watch.node, {(s.sop_class, str(s.transfer_syntax)) for s in seeds})
    sent: dict[str, tuple[fuzz.Mutant, int | None]] = {}
    answers: Counter[tuple[str, str]] = Counter()
    try:
        for n in range(MUTANTS):
            mutant = fuzz.mutate(rng, seeds[n % len(seeds)], f"2.25.{rng.getrandbits(120)}")
            path = tmp_path / f"{n:03d}.dcm"
            meta = file_meta(mutant.sop_class, mutant.sop_instance, mutant.transfer_syntax, "PYNETDICOM")
            path.write_bytes(meta + mutant.data)
            status = sender.send(path)
            sent[mutant.sop_instance] = (mutant, status)
            answers[(mutant.mutation, "none" if status is None else f"{status:04X}")] += 1
            if (n + 1) % BATCH == 0 or n + 1 == MUTANTS:
                watch.after_batch(f"mutated data sets up to {n}")
    finally:
        sender.close()
    print(f"\n[fuzz seed {SEED}] answers to {MUTANTS} mutated data sets: {dict(sorted(answers.items()))}")
    unanswered = [(m.seed, m.mutation) for m, status in sent.values() if status is None]
    assert not unanswered, _seeded(f"C-STOREs without an answer: {unanswered}")
    refused_originals = [(m.seed, f"{s:04X}") for m, s in sent.values() if m.mutation == "none" and s != SUCCESS]
    assert not refused_originals, _seeded(f"real files refused unchanged: {refused_originals}")
    _acknowledged_are_stored_and_nothing_else(watch.node, sent)


def _acknowledged_are_stored_and_nothing_else(node: NodeProcess, sent: dict) -> None:
    """Every Success is indexed with its exact bytes in its file; nothing refused is in the
    index or the store; no temporary, landed or quarantined file is left."""
    indexed = _instances(node)
    for uid, (mutant, status) in sent.items():
        what = f"{mutant.seed} {mutant.mutation} -> {status if status is None else hex(status)}"
        if status == SUCCESS:
            assert uid in indexed, _seeded(f"answered Success but not indexed: {what}")
            relpath, sha = indexed[uid]
            stored = node.storage / relpath
            assert stored.is_file(), _seeded(f"answered Success, indexed, but no file: {what}")
            assert stored.read_bytes().endswith(mutant.data), _seeded(f"stored bytes differ from those sent: {what}")
            assert sha == hashlib.sha256(mutant.data).hexdigest(), _seeded(
                f"indexed hash is not the data set's: {what}"
            )
        else:
            assert uid not in indexed, _seeded(f"refused but indexed: {what}")
    _store_holds_only_the_indexed(node, indexed)


def _store_holds_only_the_indexed(node: NodeProcess, indexed: dict[str, tuple[str, str]]) -> None:
    """The store holds the indexed instances' files and nothing else: no temporary file of a
    refused or abandoned data set, nothing landed and never indexed, nothing quarantined."""
    files = set(stored_files(node))
    expected = {node.storage / relpath for relpath, _ in indexed.values()}
    assert files == expected, _seeded(f"files in the store beyond the indexed ones: {sorted(files - expected)}")


# --- 4. idle and half-open connections against the slot limits ---------------------------------


def test_idle_and_half_open_connections_against_the_slot_limits(watch):
    """Strangers fill the pending limits with half requests and idle connections, known
    peers fill every association slot and then send nothing, other connections close their
    side at once: DCMTK peers get through while the pending places are held, ARTIM and the
    network timeout close the rest, and every place, slot and thread is given back."""
    node = watch.node
    # 12 strangers pending (4 per address) hold the total; 4 more are refused at once.
    held = stall(node, "127.0.0.2", 4) + stall(node, "127.0.0.3", 4, sent=0) + stall(node, "127.0.0.4", 4, sent=3)
    refused = stall(node, "127.0.0.5", 4)
    try:
        assert wait_for(lambda: count_closed(refused) == 4, 60), _seeded("over the pending limit, not refused")
        _legitimate_peers_served(node)
        # ARTIM (3 s) closes every held one; their places are given back.
        assert wait_for(lambda: count_closed(held) == len(held), 120), _seeded(f"{count_closed(held)} closed")
    finally:
        close_all(held + refused)
    # Half-open from the peers' own address: connections that close their side at once.
    for _ in range(50):
        assert exchange(node.port, b"") == b""
    # Every association slot taken by a known peer that then says nothing: the node ends them
    # at its network timeout (3 s) and the slots come back.
    idle = [associated(node.port) for _ in range(4)]
    try:
        assert wait_for(lambda: count_closed(idle) == 4, 120), _seeded("idle associations kept their slots")
    finally:
        close_all(idle)
    assert "network timeout" in node.log_text()
    _pending_places_given_back(node)
    watch.after_batch("idle and half-open connections")
    _legitimate_peers_served(node)


def _legitimate_peers_served(node: NodeProcess) -> None:
    stored = storescu(node, CT)
    assert stored.returncode == 0 and "Received Store Response (Success)" in stored.stderr, _seeded(
        stored.stderr[-2000:]
    )


def _pending_places_given_back(node: NodeProcess) -> None:
    """After everything the fuzzing did from 127.0.0.1, four half requests from there are all
    held (the per-address limit is 4): no closed connection still counts as pending."""

    def four_held() -> bool:
        socks = stall(node, "127.0.0.1", 4)
        try:
            return wait_for(lambda: count_closed(socks) > 0, 0.5) is False
        finally:
            close_all(socks)

    assert wait_for(four_held, 30), _seeded("closed connections still hold pending places")


# --- 5. at the end: memory and the sandbox -------------------------------------------------------


def test_memory_stayed_bounded(watch):
    """The receiver's resident memory across every batch so far: bounded, and not growing."""
    watch.after_batch("the end")
    first, last = watch.rss[0], watch.rss[-1]
    samples = [f"{r >> 20}" for r in watch.rss]
    print(f"\n[fuzz seed {SEED}] receiver RSS per batch (MiB): {' '.join(samples)}; peak {peak_rss(watch.pid) >> 20}")
    assert last - first < RSS_GROWTH_LIMIT, _seeded(f"receiver RSS grew {first >> 20} -> {last >> 20} MiB: {samples}")


def test_nothing_written_outside_storage(watch):
    """Everything the node wrote is in its storage path, or is one of its configured files
    (configuration, log, audit log, SQLite database) or its metrics folder in TMPDIR."""
    node, sandbox = watch.node, watch.sandbox
    allowed_files = {node.config_path, node.log_path, Path(node.config["audit"]["path"])}
    database = Path(node.database_url.removeprefix("sqlite:///"))
    outside = []
    for path in sandbox.rglob("*"):
        if path.is_dir() or node.storage in path.parents or path in allowed_files:
            continue
        if path.parent == database.parent and path.name.startswith(database.name):  # -wal, -shm, -journal
            continue
        tmp = sandbox / "tmp"
        if path.parent.parent == tmp and path.parent.name.startswith("ainode-metrics-") and path.suffix == ".db":
            continue
        outside.append(path.relative_to(sandbox))
    assert not outside, _seeded(f"written outside storage.path: {sorted(map(str, outside))}")
    assert not any((sandbox / "cwd").iterdir()) and not any((sandbox / "home").iterdir())
