"""Churn (issue 27, section 4): containerd nodes pull a rotating set of images through the registry while a
loop changes them in the daemon: rebuilds a tag with new content, removes one (`rmi`), removes everything
(`image prune -af`), pulls one from the upstream again and retags. bench/churn.py runs it for minutes and
prints numbers, tests/world/test_churn.py for a minute and asserts; this is what they share.

The images: locally built tags (FROM scratch builds of seeded data, tests/world/images.py; a rebuild keeps
the lower data layer and changes the top one) that exist nowhere but in the daemon, an alias tag on one of
them, and images pushed to the world's upstream registry and pulled from it (the same image ID whenever
the daemon has one). Nodes pull a local tag by the registry's own name (`REGISTRY/churn-k0:1`: Docker's
`churn-k0:1`, Podman's `localhost/churn-k0:1`, found as `podman run` finds it), an upstream image by its
upstream name. Neither leaves loopback: a tag the daemon lacks is pulled through the daemon from the name's
registry, and containerd falls back to that registry when the mirror fails, while the registry's own
namespace is never pulled (`docker.io/…` would reach for the internet; `localhost/…` has Podman 5, whose root
has no /etc/hosts, ask DNS for `localhost`).

Judged after the run, from the churn loop's record of what the daemon had under each tag when:

- a completed pull is byte-exact: ctr unpacked it, which checks every layer against the config's diff IDs,
  and the daemon had that image under the tag at some moment of the pull (its image ID is the config's
  digest, on the containerd image store the manifest's);
- a failed pull is explained when during it everything was pruned, the tag was removed, or it moved while
  an image was removed, or when a local tag was absent as it began; anything else is ODD, and so is a pull
  that got no answer within the timeout;
- after a failure the node tries the same reference again (a local tag once it exists again), up to
  MAX_TRIES times in a row;
- containerd asking the upstream itself means the mirror failed it: explained only during a pull of that
  image, by a node of that version, that failed or was disturbed (and then may have completed from there).
"""

from __future__ import annotations

import collections
import datetime
import functools
import itertools
import json
import os
import random
import re
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from k3d_registry_dockerd.web.blobs import READERS

from .daemons import (
    CommandError,
    Containerd,
    Dockerd,
    Podman,
    RegistryProcess,
    UpstreamRegistry,
    unix_http,
)
from .images import MiB, build_image, host_platform
from .test_in_place import cache_blobs
from .test_mirror import exports, node_digest, node_name

Daemon = Dockerd | Podman

TAG = "1"
UPSTREAM_TAG = "v1"
PULL_TIMEOUT = 120.0
GRACE = 1.0
"""A change that ended this long before a pull began still counts as during it: layer files and content go
after the command returns."""
MAX_TRIES = 5
CYCLE = ("rebuild", "rmi", "restore", "tag", "rmi", "restore", "pull", "rebuild", "prune", "restore")
"""The churn loop's steps, round and round; `restore` brings back every tag that is gone (a rebuild, a
pull, a tag), so most of the time most tags exist."""


@dataclass(frozen=True)
class Explained:
    """Warnings and errors of the registry's log that churn causes, with why."""

    pattern: re.Pattern[str]
    why: str
    after: re.Pattern[str] | None = None
    """Only just after such a line (the next line about the same failure)."""
    during_removal: bool = False
    """Only while an `rmi` or a prune ran."""


THREAD_POOLS = READERS + min(4, os.cpu_count() or 1) + min(32, (os.cpu_count() or 1) + 4)
"""The registry's bounded pools (reading pieces, hashing, asyncio's default executor), which start threads as
work comes and keep them: all the registry may have more than before the churn, whatever the pulls."""
_GONE = re.compile(r"is gone from the daemon's store or changed")
_PULL_FAILED = re.compile(r"WARNING k3d_registry_dockerd\.mirror: pull of \S+ failed: ")
_LOOKUP_FAILED = re.compile(r"WARNING k3d_registry_dockerd\.mirror: looking up \S+ in Docker failed: ")
EXPLAINED_LOG = (
    Explained(_GONE, "layer files vanished while they were read (removed, or the image re-pulled)"),
    Explained(
        re.compile(r"WARNING k3d_registry_dockerd\.web: sending \S+ aborted"), "that answer cut", _GONE
    ),
    Explained(
        re.compile(r"is gone from containerd's content store"),
        "a blob containerd collected after its image was removed: 404, the image resolved again",
    ),
    Explained(
        _PULL_FAILED,
        "the daemon's pull for the registry failed while an rmi or prune removed what it was adding (Podman)",
        during_removal=True,
    ),
    Explained(
        re.compile(r"-> 502 UNAVAILABLE: pulling \S+ through Docker failed"), "its answer: 502", _PULL_FAILED
    ),
    Explained(
        _LOOKUP_FAILED,
        "the daemon failed to look up an image an rmi or prune was removing (Podman: 500, image not known)",
        during_removal=True,
    ),
    Explained(
        re.compile(r"-> 503 UNAVAILABLE: Docker failed to look up "), "its answer: 503", _LOOKUP_FAILED
    ),
)
_TROUBLE = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")
# A line of the registry's log with the lines that continue it (a traceback).
_RECORD = re.compile(r"^\d{4}-\d\d-\d\d .*(?:\n(?!\d{4}-\d\d-\d\d |--- ).*)*", re.MULTILINE)
_FALLBACK = re.compile(r"not served in place, exported from the daemon instead")


def cli(daemon: Daemon, *args: str, timeout: float = 300) -> str:
    """The daemon's own CLI: docker, or podman on Podman's store."""
    if isinstance(daemon, Dockerd):
        return daemon.docker(*args, timeout=timeout).stdout
    return daemon.podman(*args, timeout=timeout).stdout


def image_id(daemon: Daemon, ref: str) -> str | None:
    """The daemon's image ID for a reference, None if it has none (the Engine API, Podman's too)."""
    status, body = unix_http(daemon.socket, "GET", f"/images/{ref}/json", timeout=60)
    if status == 404:
        return None
    if status != 200:
        raise RuntimeError(f"GET /images/{ref}/json: {status} {body[:300]!r}")
    return str(json.loads(body)["Id"])


def last_error(stderr: str) -> str:
    """ctr's own error line (it logs much else to stderr)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return next((line for line in reversed(lines) if line.startswith("ctr: ")), lines[-1] if lines else "")


def pulled_digests(node: Containerd, ref: str) -> tuple[str, str]:
    """(manifest or index digest, the host platform's config digest) of an image the node has."""
    target = node_digest(node, ref)
    manifest = json.loads(node.ctr("content", "get", target).stdout)
    if "manifests" in manifest:
        os_name, arch = host_platform().split("/")[:2]
        entry = next(
            m
            for m in manifest["manifests"]
            if m.get("platform", {}).get("os") == os_name and m["platform"].get("architecture") == arch
        )
        manifest = json.loads(node.ctr("content", "get", entry["digest"]).stdout)
    return target, str(manifest["config"]["digest"])


@dataclass(frozen=True)
class Ref:
    name: str
    """Short, for tables: k0, alias, up0."""
    kind: str
    """local, alias or upstream."""
    daemon_ref: str
    node_ref: str


@dataclass
class Op:
    """One step of the churn loop; `after` is every tag's image ID once it was done (None: gone)."""

    kind: str
    target: str
    began: float
    ended: float
    error: str = ""
    after: dict[str, str | None] = field(default_factory=dict)


@dataclass
class Pull:
    node: str
    ref: str
    phase: str
    """warm-up, churn or final."""
    began: float
    ended: float
    error: str = ""
    manifest: str = ""
    config: str = ""
    tries: int = 1
    """The n-th try of this reference in a row (after failures)."""
    verdict: str = ""
    note: str = ""
    """For a pull that failed while its tag stayed: whether the image had gone and come back."""
    odd: bool = False


class Churn:
    """The images, the churn loop, the node workers and the record they write; judge() afterwards."""

    def __init__(
        self,
        daemon: Daemon,
        registry: RegistryProcess,
        upstream: UpstreamRegistry,
        nodes: Sequence[Containerd],
        *,
        locals_: int = 3,
        upstreams: int = 2,
        image_mib: float = 4,
        pause: float = 0.5,
        node_pause: float = 0.2,
        pull_timeout: float = PULL_TIMEOUT,
        seed: str = "churn",
    ) -> None:
        self.daemon = daemon
        self.registry = registry
        self.upstream = upstream
        self.nodes = list(nodes)
        self.node_names = [f"{node_name(node)}-{i}" for i, node in enumerate(self.nodes)]
        self.image_bytes = int(image_mib * MiB)
        self.pause = pause
        self.node_pause = node_pause
        self.pull_timeout = pull_timeout
        self.seed = seed
        prefix, own = ("localhost/" if isinstance(daemon, Podman) else ""), registry.addr
        names = [*(f"churn-k{i}" for i in range(locals_)), "churn-alias"]
        self.refs = [
            Ref(name.removeprefix("churn-"), "alias" if name == "churn-alias" else "local",
                f"{prefix}{name}:{TAG}", f"{own}/{name}:{TAG}")
            for name in names
        ] + [
            Ref(f"up{i}", "upstream", f"{upstream.addr}/churn/up{i}:{UPSTREAM_TAG}",
                f"{upstream.addr}/churn/up{i}:{UPSTREAM_TAG}")
            for i in range(upstreams)
        ]  # fmt: skip
        self.by_name = {ref.name: ref for ref in self.refs}
        self.source_prefix = prefix
        # On the containerd image store an image ID is its manifest's digest, elsewhere its config's.
        self.ids_are_manifests = isinstance(daemon, Dockerd) and daemon.variant.containerd_store
        self.fixed: dict[str, str] = {}
        self.generation: collections.Counter[str] = collections.Counter()
        self.initial: dict[str, str | None] = {}
        self.state: dict[str, str | None] = {}
        self.ops: list[Op] = []
        self.pulls: list[Pull] = []
        self.crashes: list[str] = []
        self.rng = random.Random(f"{seed}/loop")
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ the daemon's side

    def prepare(self) -> None:
        """Upstream images pushed and pulled back (their IDs noted), local tags built, the alias tagged."""
        for ref in self.refs:
            if ref.kind == "upstream":
                source = f"{self.source_prefix}churn-src-{ref.name}:{TAG}"
                build_image(
                    self.daemon, source, layers=2, size=self.image_bytes, seed=f"{self.seed}/{ref.name}"
                )
                cli(self.daemon, "tag", source, ref.daemon_ref)
                cli(self.daemon, "push", ref.daemon_ref)
                cli(self.daemon, "rmi", source, ref.daemon_ref)
                cli(self.daemon, "pull", "-q", ref.daemon_ref)
                found = image_id(self.daemon, ref.daemon_ref)
                assert found is not None
                self.fixed[ref.name] = found
            elif ref.kind == "local":
                self.build(ref)
        cli(self.daemon, "tag", self.by_name["k0"].daemon_ref, self.by_name["alias"].daemon_ref)
        self.initial = self.observe()
        self.state = dict(self.initial)

    def build(self, ref: Ref) -> None:
        """A new generation of a local tag: the lower data layer as before, the top one new."""
        generation = self.generation[ref.name]
        self.generation[ref.name] += 1
        seeds = (f"{self.seed}/{ref.name}/base", f"{self.seed}/{ref.name}/{generation}")
        build_image(self.daemon, ref.daemon_ref, size=self.image_bytes, layer_seeds=seeds)

    def observe(self) -> dict[str, str | None]:
        return {ref.name: image_id(self.daemon, ref.daemon_ref) for ref in self.refs}

    def op(self, kind: str, target: str, action: Callable[[], object]) -> None:
        began = time.time()
        error = ""
        try:
            action()
        except (CommandError, subprocess.TimeoutExpired, RuntimeError) as exc:
            error = last_error(getattr(exc, "stderr", None) or str(exc))
        after = self.observe()
        with self.lock:
            self.ops.append(Op(kind, target, began, time.time(), error, after))
            self.state = after

    def restore(self) -> None:
        """Brings back every tag that is gone: local ones rebuilt, upstream ones pulled, the alias tagged."""
        for ref in self.refs:
            if self.state[ref.name] is not None:
                continue
            if ref.kind == "local":
                self.op("rebuild", ref.name, functools.partial(self.build, ref))
            elif ref.kind == "upstream":
                self.op("pull", ref.name, functools.partial(cli, self.daemon, "pull", "-q", ref.daemon_ref))
        if self.state["alias"] is None:
            self.retag()

    def retag(self) -> None:
        sources = [ref for ref in self.refs if ref.kind == "local" and self.state[ref.name]]
        if sources:
            source = self.rng.choice(sources).daemon_ref
            alias = self.by_name["alias"].daemon_ref
            self.op("tag", "alias", functools.partial(cli, self.daemon, "tag", source, alias))

    def churn_loop(self) -> None:
        rng = self.rng
        locals_ = [ref for ref in self.refs if ref.kind == "local"]
        upstreams = [ref for ref in self.refs if ref.kind == "upstream"]
        for step in itertools.count():
            if self.stop.is_set():
                return
            kind = CYCLE[step % len(CYCLE)]
            if kind == "restore":
                self.restore()
            elif kind == "rebuild":
                ref = rng.choice(locals_)
                self.op("rebuild", ref.name, functools.partial(self.build, ref))
            elif kind == "rmi":
                present = [ref for ref in self.refs if self.state[ref.name]]
                if present:
                    ref = rng.choice(present)
                    self.op("rmi", ref.name, functools.partial(cli, self.daemon, "rmi", ref.daemon_ref))
            elif kind == "tag":
                self.retag()
            elif kind == "pull":
                ref = rng.choice(upstreams)
                self.op("pull", ref.name, functools.partial(cli, self.daemon, "pull", "-q", ref.daemon_ref))
            else:
                self.op("prune", "all", functools.partial(cli, self.daemon, "image", "prune", "-af"))
            self.stop.wait(self.pause)

    # ------------------------------------------------------------------ the nodes' side

    def pull(self, index: int, ref: Ref, phase: str, tries: int = 1) -> Pull:
        """One `ctr images pull` (unpacked) through the mirror, then the node emptied for the next."""
        node = self.nodes[index]
        began = time.time()
        try:
            done = node.pull(ref.node_ref, timeout=self.pull_timeout)
            error = "" if done.returncode == 0 else last_error(done.stderr) or f"exit {done.returncode}"
        except subprocess.TimeoutExpired:
            error = f"no answer within {self.pull_timeout:g}s"
        record = Pull(self.node_names[index], ref.name, phase, began, time.time(), error, tries=tries)
        if not error:
            record.manifest, record.config = pulled_digests(node, ref.node_ref)
        node.clean()
        with self.lock:
            self.pulls.append(record)
        return record

    def node_loop(self, index: int) -> None:
        """The references in turn, each node from its own offset; after a failure the same one again."""
        order = self.refs[index % len(self.refs) :] + self.refs[: index % len(self.refs)]
        position, tries, again = 0, 0, None
        while not self.stop.is_set():
            ref = again or order[position % len(order)]
            if again is None:
                position += 1
            if ref.kind != "upstream" and self.state[ref.name] is None:
                self.stop.wait(0.1)
                continue
            try:
                failed = bool(self.pull(index, ref, "churn", tries + 1).error)
            except Exception as exc:
                self.crashes.append(f"{self.node_names[index]} {ref.name}: {type(exc).__name__}: {exc}"[:600])
                failed = True
            again, tries = (ref, tries + 1) if failed and tries + 1 < MAX_TRIES else (None, 0)
            self.stop.wait(self.node_pause)

    def every_node_pulls_everything(self, phase: str, tries: int = 1) -> list[Pull]:
        """Each node pulls each reference, the nodes at the same time (the warm-up, and the final pass after
        every tag was restored), a reference that fails up to `tries` times."""
        results: list[Pull] = []

        def one_node(index: int) -> None:
            for ref in self.refs:
                for attempt in range(1, tries + 1):
                    results.append(self.pull(index, ref, phase, attempt))
                    if not results[-1].error:
                        break

        threads = [
            threading.Thread(target=self._guarded, args=(functools.partial(one_node, i),), name=name)
            for i, name in enumerate(self.node_names)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._guarded, args=(self.churn_loop,), name="churn")] + [
            threading.Thread(target=self._guarded, args=(functools.partial(self.node_loop, i),), name=name)
            for i, name in enumerate(self.node_names)
        ]
        for thread in self._threads:
            thread.start()

    def _guarded(self, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as exc:
            self.crashes.append(f"{threading.current_thread().name}: {type(exc).__name__}: {exc}"[:600])

    def finish(self) -> None:
        """Stops the loop and the nodes (a pull in flight runs to its end or timeout)."""
        self.stop.set()
        for thread in self._threads:
            thread.join(self.pull_timeout + 120)

    # ------------------------------------------------------------------ judging

    def _state_at(self, ref: Ref, when: float) -> str | None:
        state = self.initial[ref.name]
        for op in self.ops:
            if op.ended <= when:
                state = op.after[ref.name]
        return state

    def ids_during(self, ref: Ref, began: float, ended: float) -> set[str]:
        """Every image ID the daemon had under the tag at some moment between began and ended."""
        ids = {self._state_at(ref, began), self.fixed.get(ref.name)}
        ids |= {op.after[ref.name] for op in self.ops if op.ended > began and op.began < ended}
        return {found for found in ids if found}

    def disturbance(self, ref: Ref, began: float, ended: float) -> str:
        """What the churn did to the tag during a pull that makes its failure expected; "" if nothing."""
        start = began - GRACE
        before = self._state_at(ref, start)
        moved = removed_any = False
        for op in self.ops:
            if op.ended <= start:
                continue
            if op.began > ended:
                break
            after = op.after[ref.name]
            if op.kind == "prune":
                return "pruned during the pull"
            if (op.kind == "rmi" and op.target == ref.name and not op.error) or (before and not after):
                return "removed during the pull"
            moved |= bool(before and after and before != after)
            removed_any |= op.kind == "rmi" and not op.error
            before = after
        if moved and removed_any:
            return "moved while an image was removed"
        if ref.kind != "upstream" and self._state_at(ref, began) is None:
            return "absent when the pull began"
        return ""

    def _came_back(self, ref: Ref, when: float) -> str:
        """When the tag last went and came back with the image ID it had, before `when`, as a sentence."""
        state, gone, back, lost = self.initial[ref.name], None, None, None
        for op in self.ops:
            if op.ended > when:
                break
            after = op.after[ref.name]
            if state and not after:
                gone, lost, back = op.ended, state, None
            elif not state and after == lost:
                back = op.ended
            state = after
        if gone is None:
            return ""
        at = time.strftime("%H:%M:%S", time.localtime(gone))
        if state is None and ref.kind == "upstream":
            return f"gone at {at}: the registry had the daemon pull it again for this pull"
        if back is not None:
            return f"gone at {at}, back with the same image ID {when - back:.1f}s before the pull"
        return ""

    def judge(self) -> None:
        for pull in self.pulls:
            ref = self.by_name[pull.ref]
            if not pull.error:
                got = pull.manifest if self.ids_are_manifests else pull.config
                ids = self.ids_during(ref, pull.began, pull.ended)
                pull.odd = got not in ids
                pull.verdict = (
                    f"WRONG CONTENT: {got}, while the daemon had {sorted(ids)}" if pull.odd else "byte-exact"
                )
            elif pull.error.startswith("no answer"):
                pull.verdict, pull.odd = "hang", True
            else:
                reason = self.disturbance(ref, pull.began, pull.ended)
                pull.verdict, pull.odd = (reason, False) if reason else ("failed while the tag stayed", True)
                pull.note = "" if reason else self._came_back(ref, pull.began)
            if pull.tries == MAX_TRIES and pull.error:
                pull.verdict, pull.odd = f"{pull.verdict}; gave up after {MAX_TRIES} tries", True

    def retries(self) -> dict[str, int]:
        """What each node's next try of a reference that failed did."""
        outcome: collections.Counter[str] = collections.Counter()
        by_node: dict[str, list[Pull]] = collections.defaultdict(list)
        for pull in self.pulls:
            if pull.phase == "churn":
                by_node[pull.node].append(pull)
        for pulls in by_node.values():
            for first, then in itertools.zip_longest(pulls, pulls[1:]):
                if not first.error:
                    continue
                if then is None or then.ref != first.ref:
                    outcome["not tried again (the churn stopped, or gave up)"] += 1
                else:
                    outcome["next try worked" if not then.error else "next try failed too"] += 1
        return dict(outcome)

    def upstream_requests(self, since: int) -> dict[str, Any]:
        """The upstream's requests since a log mark by client; containerd's own (the mirror failed it) each
        put with the pulls of that image by nodes of that version going on in that second: failed ones,
        disturbed ones that completed (partly from the upstream), or none of those (odd)."""
        agents = {
            name: f"containerd/{node.version}" for name, node in zip(self.node_names, self.nodes, strict=True)
        }
        by_agent: collections.Counter[str] = collections.Counter()
        found: dict[str, list[str]] = {"during_failed": [], "during_completed": [], "odd": []}
        for entry in self.upstream.requests(since):
            by_agent[entry.agent.split(" ")[0]] += 1
            if not entry.agent.startswith("containerd/") or entry.at is None:
                continue
            repository = entry.path.removeprefix("/v2/").split("/manifests/")[0].split("/blobs/")[0]
            during = [
                pull
                for pull in self.pulls
                if self.by_name[pull.ref].node_ref.startswith(f"{self.upstream.addr}/{repository}:")
                and agents[pull.node] == entry.agent
                and int(pull.began) <= entry.at <= pull.ended
            ]
            at = time.strftime("%H:%M:%S", time.localtime(entry.at))
            line = f"{entry.method} {entry.path} {entry.status} {entry.agent} at {at}"
            if any(pull.error for pull in during):
                found["during_failed"].append(line)
            elif any(self.disturbance(self.by_name[p.ref], p.began, p.ended) for p in during):
                found["during_completed"].append(line)
            else:
                found["odd"].append(f"{line}, during {[f'{p.node} {p.ref}' for p in during] or 'no pull'}")
        return {"by_agent": dict(by_agent), **{f"containerd_{key}": lines for key, lines in found.items()}}

    def _explains(self, explained: Explained, line: str, recent: Sequence[str]) -> bool:
        if not explained.pattern.search(line):
            return False
        if explained.after and not any(explained.after.search(before) for before in recent):
            return False
        if explained.during_removal:
            at = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            return any(op.began - 1 <= at <= op.ended + 1 for op in self.ops if op.kind in ("rmi", "prune"))
        return True

    def _names_of(self, image: str) -> str:
        """The tags the churn saw an image ID under."""
        states = [self.initial, *(op.after for op in self.ops)]
        hex_id = image.removeprefix("sha256:")
        names = {
            name for state in states for name, found in state.items() if found and found.endswith(hex_id)
        }
        return ", ".join(sorted(names)) or "no tag the churn saw"

    def summary(self, log_text: str, upstream_mark: int, since: float) -> dict[str, Any]:
        """Everything a report or an assertion needs, JSON-able; call after judge()."""
        trouble: collections.Counter[str] = collections.Counter()
        unexplained: list[str] = []
        recent: collections.deque[str] = collections.deque(maxlen=3)
        for record in _RECORD.findall(log_text):
            if not _TROUBLE.search(record):
                continue
            why = next((e.why for e in EXPLAINED_LOG if self._explains(e, record, recent)), None)
            if why:
                trouble[why] += 1
            else:
                unexplained.append(record.strip()[:4000])
            recent.append(record)
        verdicts: collections.Counter[str] = collections.Counter(
            f"{pull.phase}: {pull.verdict}" for pull in self.pulls
        )
        blobs = cache_blobs(self.registry.cache_dir)
        return {
            "refs": [asdict(ref) for ref in self.refs],
            "upstream_ids": self.fixed,
            "pulls_by_node": {
                name: _counts([p for p in self.pulls if p.node == name and p.phase == "churn"])
                for name in self.node_names
            },
            "ops_by_kind": {
                kind: _counts([op for op in self.ops if op.kind == kind])
                for kind in sorted({op.kind for op in self.ops})
            },
            "verdicts": dict(sorted(verdicts.items())),
            "odd_pulls": [asdict(p) for p in self.pulls if p.odd],
            "failures": [
                f"{time.strftime('%H:%M:%S', time.localtime(p.began))} {p.node} {p.ref} (try {p.tries}, "
                f"{p.ended - p.began:.1f}s): {p.verdict}{f' ({p.note})' if p.note else ''}: {p.error[:300]}"
                for p in self.pulls
                if p.error
            ],
            "errors_by_verdict": {
                verdict: dict(
                    collections.Counter(_elided(p.error) for p in self.pulls if p.verdict == verdict)
                )
                for verdict in sorted({p.verdict for p in self.pulls if p.error})
            },
            "retries": self.retries(),
            "crashes": self.crashes,
            "upstream": self.upstream_requests(upstream_mark),
            "registry_log": {
                "exports": exports(self.registry),
                "fallbacks": [line[:400] for line in log_text.splitlines() if _FALLBACK.search(line)],
                "explained": dict(trouble),
                "unexplained": unexplained,
            },
            "cache": {
                "blob_files": len(blobs),
                "blob_bytes": sum(path.stat().st_size for path in blobs),
                "records": _files(self.registry.cache_dir / "repositories"),
                "tmp_files": _files(self.registry.cache_dir / "tmp"),
            },
            "daemon_saves": [
                f"{saved} ({self._names_of(saved)})" for saved in self.daemon.image_saves(since)
            ],
        }


def _elided(error: str) -> str:
    """ctr's error without what differs from pull to pull: digests, addresses, sizes."""
    error = re.sub(r"sha256:[0-9a-f]{64}", "sha256:…", error)
    error = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:…", error)
    error = re.sub(r'"[^"]*/churn[^"]*"', '"…"', error)
    return re.sub(r"\b\d{4,}\b", "N", error)


def _files(directory: Path) -> int:
    return sum(1 for path in directory.rglob("*") if path.is_file()) if directory.exists() else 0


def _counts(items: Sequence[Pull | Op]) -> dict[str, Any]:
    """How many worked and failed, and the seconds the ones that worked took."""
    seconds = [item.ended - item.began for item in items if not item.error]
    return {
        "ok": len(seconds),
        "failed": len(items) - len(seconds),
        "median_s": statistics.median(seconds) if seconds else 0.0,
        "max_s": max(seconds, default=0.0),
    }
