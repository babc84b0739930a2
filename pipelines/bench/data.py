"""Ray Data preprocessing vs a plain loop:
`python -m pipelines.bench data [--files N] [--repeats N] [--subset-every N] [hydra overrides...]`.

Both sides run the same stages on the same input with the same (pre-trained) tokenizer: read ->
normalize -> filter -> hash+MinHash -> dedup -> split -> tokenize -> pack -> write shards. They run
in alternating pairs in this one run (Ray, plain, Ray, plain, ...; `--repeats` pairs, default 3),
so a change in the shared machine's load hits both sides; the goal is the median pair's ratio.
Before each pair, a pair on a subset (1 file in `--subset-every`, default 4) splits each side's
time into a fixed cost per run and a marginal rate: tokens/s beyond the subset, the throughput a
larger corpus approaches, reported next to the goal, not instead of it.
The plain side is a single-process loop over the very same stage functions; the Ray side is
`pipelines.data.pipeline` (tasks for the document stages, an actor pool for tokenization).
Goal: Ray tokens/s >= 1.6x the loop's. Both must produce the same number of tokens, which the
benchmark checks. The table shows, for the median pair, where the loop spends its time per stage
and the Ray phases next to the stage groups they cover.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import re
import shutil
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from moe.files import TOKENIZER_FILE
from pipelines.bench import BenchResult, Goal
from pipelines.data import dedup, sources
from pipelines.data.clean import normalize_batch
from pipelines.data.config import PreprocessConfig, SourceConfig, compose_preprocess_config
from pipelines.data.dedup_cluster import decisions_digest, digest_dir
from pipelines.data.filters import filter_batch
from pipelines.data.pack import TokenizePack
from pipelines.data.pipeline import (
    build_docs,
    build_manifest,
    configure_data_context,
    ensure_ray,
    stage_corpus,
    write_dataset,
)
from pipelines.data.shards import shard_name, write_shard_file
from pipelines.data.split import SPLITS, split_batch
from pipelines.data.tokenizer import train_tokenizer

TARGET = 1.6


class PlainShardWriter:
    """The plain loop's writer: each split's packed rows in order, a shard every `rows` sequences."""

    def __init__(self, out: Path, rows: int) -> None:
        self.out, self.rows = out, rows
        self.pending: dict[str, list[pa.Table]] = {s: [] for s in SPLITS}
        self.written = dict.fromkeys(SPLITS, 0)
        self.shards = dict.fromkeys(SPLITS, 0)
        self.tokens = 0
        for s in SPLITS:
            (out / s).mkdir(parents=True, exist_ok=True)

    def add(self, packed: pa.Table) -> None:
        self.tokens += int(pa.compute.sum(packed.column("n_tokens")).as_py() or 0)
        for s in SPLITS:
            self.pending[s].append(packed.filter(pa.compute.equal(packed.column("split"), s)))
            while sum(len(t) for t in self.pending[s]) >= self.rows:
                self._flush(s, self.rows)

    def _flush(self, s: str, n: int) -> None:
        t = pa.concat_tables(self.pending[s]).combine_chunks()
        write_shard_file(t.slice(0, n), self.written[s], self.out / s / shard_name(self.shards[s]))
        self.written[s] += min(n, len(t))
        self.shards[s] += 1
        self.pending[s] = [t.slice(n)]

    def close(self) -> int:
        for s in SPLITS:
            n = sum(len(t) for t in self.pending[s])
            if n or not self.shards[s]:
                self._flush(s, n)
        return self.tokens


def plain_loop(cfg: PreprocessConfig, files: list[sources.InputFile], tokenizer: Path, out: Path
               ) -> tuple[int, dict[str, float], str]:
    """The same stages in one process; -> (real tokens written, seconds per stage, dedup digest)."""
    t: dict[str, float] = defaultdict(float)

    def timed(stage: str, fn, *args):
        t0 = time.perf_counter()
        r = fn(*args)
        t[stage] += time.perf_counter() - t0
        return r

    signed: list[pa.Table] = []
    for group in sources.read_tasks(files, cfg.reader.bytes_per_task):
        for table in timed("read", lambda g: list(sources.read_files(sources.files_table(g), cfg.reader)), group):
            table = timed("normalize", normalize_batch, table, cfg.normalize)
            table = timed("filter", filter_batch, table, cfg.filters)
            signed.append(timed("hash+minhash", dedup.sign_batch, table, cfg.dedup))
    docs = pa.concat_tables(signed)
    keys = docs.filter(pa.compute.equal(docs.column("reason"), ""))
    result = timed("dedup", dedup.decide, keys, cfg.dedup)
    weights = [s.weight for s in cfg.data.sources]
    kept = timed("split", split_batch, docs, set(result.dropped), cfg.data.val_fraction, weights)
    tp = TokenizePack(str(tokenizer), cfg.data.seq_len, cfg.tokenizer.eos_token, cfg.tokenizer.pad_token)
    writer = PlainShardWriter(out, cfg.runtime.rows_per_shard)
    b = cfg.runtime.tokenize_batch_docs
    for i in range(0, len(kept), b):
        batch = kept.slice(i, b)
        ids = timed("tokenize", tp.encode, batch.column("text").to_pylist())
        packed = timed("pack", tp.pack, ids, batch.column("split").to_pylist(), batch.column("copies").to_pylist())
        timed("write", writer.add, packed)
    tokens = timed("write", writer.close)
    return tokens, dict(t), decisions_digest(result.dropped)


def ray_build(cfg: PreprocessConfig, files: list[sources.InputFile], missing: list[tuple[int, str]],
              fingerprints: list[dict], tokenizer: Path, work: Path) -> tuple[dict, str]:
    """The Ray side: `pipelines.data.pipeline`'s phases A, B and D and its manifest, with the shared
    tokenizer in place of phase C (training one); -> (the manifest, digest of the dedup decision)."""
    import ray

    corpus = stage_corpus(cfg, files, missing, work)
    # On a worker: the decisions are no driver step of the pipeline, and the scale rows measure the driver.
    digest = ray.get(ray.remote(digest_dir).remote(str(corpus.dropped_dir)))
    writers = write_dataset(cfg, corpus, tokenizer, work)
    return build_manifest(cfg, corpus.facts, writers, fingerprints, "bench", "bench", tokenizer), digest


def _spin(n: int) -> float:
    t0 = time.perf_counter()
    x = 0
    for i in range(n):
        x += i * i
    return time.perf_counter() - t0


def parallel_capacity(n: int = 3_000_000) -> float:
    """How many cores two processes get right now: 2 x (one job alone) / (two jobs side by side)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_spin, [1000, 1000])  # start both processes first
        one = pool.apply(_spin, (n,))
        t0 = time.perf_counter()
        pool.map(_spin, [n, n], chunksize=1)
        two = time.perf_counter() - t0
    return 2 * one / two


def machine_cpu_seconds() -> float | None:
    """CPU-seconds all processes on this machine have used so far (Linux /proc/stat), else None."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def _delta(start: float | None) -> float | None:
    end = machine_cpu_seconds()
    return None if start is None or end is None else end - start


@dataclass
class Pair:
    """One Ray run and the plain run right after it."""

    tokens: int  # written by each side (checked equal)
    ray_s: float
    ray_phases: dict[str, float]
    ray_machine_cpu: float | None
    plain_s: float
    plain_stages: dict[str, float]
    plain_cpu: float
    plain_machine_cpu: float | None
    load_ray: float
    load_plain: float

    @property
    def speedup(self) -> float:
        return self.plain_s / self.ray_s  # tokens/s ratio, both sides wrote the same tokens


@dataclass
class Scaling:
    """A subset pair and the full pair after it: each side's time as fixed cost + tokens / marginal rate."""

    subset: Pair
    full: Pair

    @property
    def measurable(self) -> bool:
        return (self.full.tokens > self.subset.tokens and self.full.ray_s > self.subset.ray_s
                and self.full.plain_s > self.subset.plain_s)

    def marginal_tokens_per_s(self, side: str) -> float:
        dt = getattr(self.full, f"{side}_s") - getattr(self.subset, f"{side}_s")
        return (self.full.tokens - self.subset.tokens) / dt

    def fixed_s(self, side: str) -> float:
        """The line through (subset tokens, time) and (full tokens, time) at zero tokens."""
        return getattr(self.subset, f"{side}_s") - self.subset.tokens / self.marginal_tokens_per_s(side)

    @property
    def marginal_speedup(self) -> float:
        return self.marginal_tokens_per_s("ray") / self.marginal_tokens_per_s("plain")


def _median_item(items: list, key):
    """The item whose `key` is the median (the upper middle one for an even count)."""
    return sorted(items, key=key)[len(items) // 2]


def _pair(cfg: PreprocessConfig, files: list[sources.InputFile], missing: list[tuple[int, str]],
          fingerprints: list[dict], tok: Path, work: Path) -> Pair:
    ray_dir = work / "ray"
    ray_dir.mkdir()
    t0, m0 = time.perf_counter(), machine_cpu_seconds()
    info, ray_digest = ray_build(cfg, files, missing, fingerprints, tok, ray_dir)
    ray_s, ray_machine_cpu = time.perf_counter() - t0, _delta(m0)
    shutil.rmtree(ray_dir, ignore_errors=True)
    load_ray = os.getloadavg()[0]
    t0, c0, m0 = time.perf_counter(), time.process_time(), machine_cpu_seconds()
    plain_tokens, stages, plain_digest = plain_loop(cfg, files, tok, work / "plain")
    plain_s, plain_cpu, plain_machine_cpu = time.perf_counter() - t0, time.process_time() - c0, _delta(m0)
    shutil.rmtree(work / "plain", ignore_errors=True)
    ray_tokens = sum(s["tokens"] for s in info["splits"].values())
    _check_agree(plain_tokens, ray_tokens, plain_digest, ray_digest)
    return Pair(ray_tokens, ray_s, info["stage_seconds"], ray_machine_cpu, plain_s, stages, plain_cpu,
                plain_machine_cpu, load_ray, os.getloadavg()[0])


def _check_agree(plain_tokens: int, ray_tokens: int, plain_digest: str, ray_digest: str) -> None:
    if plain_tokens != ray_tokens:
        raise RuntimeError(f"the two sides disagree: plain loop wrote {plain_tokens} tokens, Ray {ray_tokens}")
    if plain_digest != ray_digest:
        raise RuntimeError("the two sides' dedup dropped different documents (cluster dedup vs dedup.decide)")


_WORD_RE = re.compile(r"\w+")


def edited_copy(text: str, copy: int) -> str:
    """Copy number `copy` of a document: every 4th word gets the copy number appended, so every
    5-word shingle changes and dedup keeps each copy (same length and tokenization cost, about).
    Copy 0 is the document itself."""
    if copy == 0:
        return text
    n = itertools.count()
    return _WORD_RE.sub(lambda m: m.group(0) + str(copy) if next(n) % 4 == 0 else m.group(0), text)


def scaled_corpus(files: list[sources.InputFile], copies: int, root: Path) -> None:
    """`root/copy<k>/<nnnnn>.py` for k < `copies`: copy 0 is the files as they are, the others edited."""
    for k in range(copies):
        d = root / f"copy{k}"
        d.mkdir(parents=True)
        for i, f in enumerate(files):
            raw = Path(f.path).read_bytes()
            try:
                data = edited_copy(raw.decode("utf-8"), k).encode("utf-8") if k else raw
            except UnicodeDecodeError:
                data = raw  # bad input stays bad input
            (d / f"{i:05d}.py").write_bytes(data)


class PeakRss:
    """The peak resident memory of this process (the driver) while the block runs, sampled every 20 ms."""

    def __enter__(self) -> PeakRss:
        self.peak, self._stop = self._rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


@dataclass
class ScaleRun:
    """The pipeline on the corpus times `copies`: Ray (with the driver's peak RSS) and the plain loop."""

    copies: int
    tokens: int
    ray_s: float
    ray_rss: int
    ray_phases: dict[str, float]  # the manifest's stage_seconds
    ray_cpu: float | None  # CPU-seconds of the driver and the local Ray's processes (None: Ray not local)
    load_ray: float
    plain_s: float = 0.0
    plain_cpu: float = 0.0
    load_plain: float = 0.0
    two_plain_s: float = 0.0  # two plain loops side by side, each in its own process: wall until both end
    two_plain_cpu: float = 0.0  # their CPU-seconds together


class TreeCpu:
    """CPU-seconds used by this process and its descendants (a local Ray's GCS, raylet, workers and
    actors) while the block runs, sampled every 200 ms per process: Ray kills actors without
    the kernel adding their time to a parent's, so each process's last sample counts (at most
    200 ms of a process that exits is missed). The sampling thread's own CPU (0.012 CPU-s per second
    with 11 processes) is left out. `seconds` is None when this process has no
    descendants (a Ray started elsewhere: its workers are not visible here)."""

    def __enter__(self) -> TreeCpu:
        self._first, self._last = self._sample(), {}
        self._last.update(self._first)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _sample() -> dict[tuple[int, float], float]:
        import psutil

        me = psutil.Process()
        out = {}
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                out[(p.pid, p.create_time())] = t.user + t.system
            except psutil.Error:  # exited since listed
                continue
        return out

    def _watch(self) -> None:
        t0 = time.thread_time()
        while not self._stop.wait(0.2):
            self._last.update(self._sample())
        self._own = time.thread_time() - t0

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._last.update(self._sample())
        self.seconds = (sum(v - self._first.get(k, 0.0) for k, v in self._last.items()) - self._own
                        if len(self._last) > 1 else None)


def _text_corpus(cfg: PreprocessConfig, root: Path) -> tuple[PreprocessConfig, list[sources.InputFile],
                                                             list[tuple[int, str]], list[dict]]:
    c = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=[SourceConfig(kind="text", path=str(root))]))
    files, missing = sources.resolve_sources(c.data.sources)
    return c, files, missing, sources.fingerprint_files(files, missing, 1)


def _ray_scale_run(cfg: PreprocessConfig, root: Path, tok: Path, work: Path) -> tuple[ScaleRun, str]:
    """The Ray side on `root` with the driver's peak RSS; -> (the run, its dedup digest)."""
    c, files, missing, fingerprints = _text_corpus(cfg, root)
    (work / "ray").mkdir()
    with PeakRss() as rss, TreeCpu() as cpu:
        t0 = time.perf_counter()
        info, digest = ray_build(c, files, missing, fingerprints, tok, work / "ray")
        ray_s = time.perf_counter() - t0
    shutil.rmtree(work / "ray")
    tokens = sum(s["tokens"] for s in info["splits"].values())
    return ScaleRun(len(list(root.glob("copy*"))) or 1, tokens, ray_s, rss.peak, info["stage_seconds"],
                    cpu.seconds, os.getloadavg()[0]), digest


def _plain_scale_run(cfg: PreprocessConfig, root: Path, tok: Path, work: Path, run: ScaleRun, ray_digest: str
                     ) -> ScaleRun:
    """The plain loop on `root`, checked against the Ray run `run` on the same corpus."""
    c, files, _, _ = _text_corpus(cfg, root)
    t0, c0 = time.perf_counter(), time.process_time()
    tokens, _, digest = plain_loop(c, files, tok, work / "plain")
    plain_s, plain_cpu = time.perf_counter() - t0, time.process_time() - c0
    shutil.rmtree(work / "plain")
    _check_agree(tokens, run.tokens, digest, ray_digest)
    return dataclasses.replace(run, plain_s=plain_s, plain_cpu=plain_cpu, load_plain=os.getloadavg()[0])


def _plain_side(cfg: PreprocessConfig, root: str, tok: str, out: str, barrier) -> tuple[int, float, float, float]:
    """One of two plain loops run side by side (in a process of its own): waits for the other one,
    then runs; -> (tokens, start, end (`time.perf_counter`, the same clock in every process), CPU-s)."""
    c, files, _, _ = _text_corpus(cfg, Path(root))
    barrier.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    tokens, _, _ = plain_loop(c, files, Path(tok), Path(out))
    t1, cpu = time.perf_counter(), time.process_time() - c0
    shutil.rmtree(out)
    return tokens, t0, t1, cpu


def two_plain_loops(cfg: PreprocessConfig, roots: list[Path], tok: Path, work: Path) -> list[tuple[float, float]]:
    """The plain loop twice at once, in two processes, on each of `roots`; -> per root (wall seconds
    from the first start to the last end, CPU-seconds of both). Two processes that share nothing
    are the most any design with two busy processes gets from this machine's cores on this work:
    their rate over one loop's is a floor under the Ray side's overhead, measured in the same run."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out = []
    with ctx.Manager() as manager, ctx.Pool(2) as pool:
        for root in roots:
            barrier = manager.Barrier(2)
            runs = pool.starmap(_plain_side, [(cfg, str(root), str(tok), str(work / f"two-plain-{i}"), barrier)
                                              for i in range(2)], chunksize=1)
            out.append((max(r[2] for r in runs) - min(r[1] for r in runs), sum(r[3] for r in runs)))
    return out


def _measure_scale(cfg: PreprocessConfig, files: list[sources.InputFile], tok: Path, work: Path, copies: int
                   ) -> list[ScaleRun]:
    """Ray x1, Ray x`copies`, then the plain loop x1 and x`copies`, then two plain loops side by
    side x1 and x`copies` (`two_plain_loops`): both Ray runs come before any
    plain loop, so nothing the loop left in this process (it holds every document; the memory it
    frees mostly stays with the process) is in the driver's RSS. Measured on 200 stdlib files: Ray
    x4 peaked at 466 MB right after Ray x1 (458 MB), at 604 MB after a plain x1 run (630 MB peak)."""
    scaled_corpus(files, copies, work / "corpus")
    roots = [work / "corpus" / "copy0", work / "corpus"]
    ray_runs = [_ray_scale_run(cfg, root, tok, work) for root in roots]
    runs = [_plain_scale_run(cfg, root, tok, work, run, digest) for root, (run, digest) in zip(roots, ray_runs)]
    runs = [dataclasses.replace(r, two_plain_s=s, two_plain_cpu=c)
            for r, (s, c) in zip(runs, two_plain_loops(cfg, roots, tok, work))]
    return [dataclasses.replace(runs[0], copies=1), runs[1]]


def _scale_rows(runs: list[ScaleRun]) -> tuple[list[dict], dict[str, Goal], list[str]]:
    a, b = runs
    rows = [{"stage": f"scale x{r.copies}", "plain_s": r.plain_s, "ray_s": r.ray_s, "tokens": r.tokens,
             "ray_driver_peak_rss_MB": r.ray_rss / 2**20, "load_1min": r.load_ray, "plain_cpu_s": r.plain_cpu,
             "ray_cpu_s": r.ray_cpu, "two_plain_s": r.two_plain_s, "two_plain_cpu_s": r.two_plain_cpu}
            for r in runs]
    dt = b.tokens - a.tokens

    def rate(ta: float, tb: float) -> float:  # noise can make the larger run no slower: no rate then
        return dt / (tb - ta) if tb > ta and dt > 0 else float("nan")

    ray_rate, plain_rate = rate(a.ray_s, b.ray_s), rate(a.plain_s, b.plain_s)
    rows.append({"stage": f"scale marginal tokens/s (x1 -> x{b.copies})", "plain_s": plain_rate, "ray_s": ray_rate})
    rows.append({"stage": "scale fixed cost per run (s)", "plain_s": a.plain_s - a.tokens / plain_rate,
                 "ray_s": a.ray_s - a.tokens / ray_rate})
    # Two plain loops side by side: twice the extra tokens in their extra wall time, over one loop's rate.
    two_rate = 2 * rate(a.two_plain_s, b.two_plain_s)
    rows.append({"stage": f"scale marginal ratio ceiling (two plain loops side by side, x1 -> x{b.copies})",
                 "plain_s": two_rate, "ray_s": two_rate / plain_rate})
    for phase in b.ray_phases:
        rows.append({"stage": f"scale Ray phase {phase} (s)", "x1_s": a.ray_phases.get(phase),
                     f"x{b.copies}_s": b.ray_phases[phase]})
    notes = [f"scale rows: the corpus as text files x1 and x{b.copies} (copies with every 4th word edited, so "
             f"dedup keeps them), Ray x1, Ray x{b.copies}, then the plain loop x1 and x{b.copies}; driver peak "
             "RSS sampled every 20 ms during each Ray run; both sides dropped the same documents in dedup"]
    if a.ray_cpu is not None and b.ray_cpu is not None and dt > 0:
        # CPU-seconds per million tokens beyond x1: what the extra documents cost each side. With
        # every core busy the Ray side can be at most cores x (plain's cost / Ray's cost) faster.
        ray_cpu, plain_cpu = (b.ray_cpu - a.ray_cpu) / dt * 1e6, (b.plain_cpu - a.plain_cpu) / dt * 1e6
        cores = os.cpu_count() or 1
        two_cpu = (b.two_plain_cpu - a.two_plain_cpu) / (2 * dt) * 1e6
        rows.append({"stage": "scale marginal CPU-s per 1M tokens", "plain_s": plain_cpu, "ray_s": ray_cpu,
                     "two_plain_s": two_cpu})
        rows.append({"stage": f"scale marginal ratio bound ({cores} cores, all busy)",
                     "ray_s": cores * plain_cpu / ray_cpu if ray_cpu > 0 else float("nan")})
        notes.append("ray_cpu_s: CPU-seconds of the driver and the local Ray's processes during the run; "
                     "plain_cpu_s: the loop's own; two_plain_s: per loop, two plain loops side by side; the "
                     "bound is the marginal ratio the cores could give at most with those CPU costs")
    notes.append("ceiling: two plain loops side by side (two processes, nothing shared), their marginal "
                 "tokens/s together over one loop's: what two busy processes get from this machine on this "
                 "work at that moment, with no overhead at all")
    goals = {f"driver_peak_rss_x{b.copies}_over_x1": Goal(b.ray_rss / a.ray_rss, 1.15, higher_is_better=False),
             "scale_marginal_tokens_per_s_vs_plain": Goal(ray_rate / plain_rate, 1.8)}
    return rows, goals, notes


def _parse_args(args: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """-> (the benchmark's options, Hydra overrides for conf/preprocess.yaml)."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench data")
    parser.add_argument("--files", type=int, default=0, help="cap the stdlib corpus (0: all files)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="Ray/plain pairs, run alternately; the goal is the median pair's speedup")
    parser.add_argument("--scale", type=int, default=4,
                        help="scale rows: the corpus x1 and xN (edited copies), Ray driver peak RSS and "
                             "wall time, marginal tokens/s of both sides (0: no scale rows)")
    parser.add_argument("--subset-every", type=int, default=4,
                        help="before each pair, a pair on 1 file in N, to measure each side's fixed cost "
                             "and marginal tokens/s (0: no subset pairs)")
    ns, overrides = parser.parse_known_args(args)
    if ns.repeats < 1:
        parser.error(f"--repeats={ns.repeats} must be at least 1")
    if ns.scale < 0 or ns.scale == 1:
        parser.error(f"--scale={ns.scale} must be 0 (off) or at least 2")
    if ns.subset_every < 0 or ns.subset_every == 1:
        parser.error(f"--subset-every={ns.subset_every} must be 0 (off) or at least 2")
    return ns, overrides


def _shared_tokenizer(cfg: PreprocessConfig, files: list[sources.InputFile], out: Path) -> Path:
    """One tokenizer for both sides, trained once on a sample of the files (not timed)."""
    texts = (sources.read_file(f, cfg.reader) for f in files[:: max(1, len(files) // 200)])
    train_tokenizer((r[2] for it in texts for r in it if not r[1]), cfg.data.vocab_size, cfg.tokenizer, out)
    return out


def _warm_up(cfg: PreprocessConfig, files: list[sources.InputFile], fingerprints: list[dict], tok: Path,
             warm: Path) -> None:
    """Untimed, as on a long-lived cluster: a small full run, then the document phase over every file,
    which starts all of Ray's worker processes and puts the input files in the page cache (the plain
    loop, running second, finds them there too)."""
    warm.mkdir()
    ray_build(cfg, files[:64], [], fingerprints, tok, warm)[0]
    build_docs(cfg, files, warm / "docs")


def _measure(cfg: PreprocessConfig, files: list[sources.InputFile], missing: list[tuple[int, str]],
             fingerprints: list[dict], ns: argparse.Namespace
             ) -> tuple[float, list[Pair], list[Scaling], list[ScaleRun]]:
    """-> (parallel capacity, the pairs, each subset pair with its full pair, the scale runs), all
    measured in one run (the scale runs first: the driver's RSS is measured before any plain loop ran)."""
    repeats, subset_every = ns.repeats, ns.subset_every
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = Path(tmp)
        tok = _shared_tokenizer(cfg, files, work / TOKENIZER_FILE)
        capacity = parallel_capacity()
        ensure_ray(cfg.runtime)  # cluster start is not part of either side
        configure_data_context(cfg)  # as `preprocess` runs it: ordered output, task-based shuffles
        _warm_up(cfg, files, fingerprints, tok, work / "warm")
        scale = _measure_scale(cfg, files, tok, work / "scale", ns.scale) if ns.scale else []
        shutil.rmtree(work / "scale", ignore_errors=True)
        # Alternate the sides, so a change in the machine's load (it is shared) hits both.
        pairs, scalings = [], []
        for _ in range(repeats):
            subset = (_pair(cfg, files[::subset_every], missing, fingerprints, tok, work)
                      if subset_every else None)
            pairs.append(_pair(cfg, files, missing, fingerprints, tok, work))
            if subset is not None:
                scalings.append(Scaling(subset, pairs[-1]))
    return capacity, pairs, scalings, scale


# Table groups: (label, the plain loop's stages, the Ray phase in the manifest's stage_seconds covering them).
_GROUPS = [("A read..minhash", ["read", "normalize", "filter", "hash+minhash"], ["read_normalize_filter_sign"]),
           ("B dedup", ["dedup"], ["dedup"]),
           ("D split..write", ["split", "tokenize", "pack", "write"], ["count", "tokenize_pack", "write_shards"])]


def _rows(shown: Pair, shown_sc: Scaling | None) -> list[dict]:
    """The median pair per stage, whole run and tokens/s; the shown subset pair's marginal rows."""
    stages, plain_s = shown.plain_stages, shown.plain_s
    rows = []
    for label, names, phase in _GROUPS:
        for n in names:
            rows.append({"stage": n, "plain_s": stages.get(n, 0.0), "plain_%": 100 * stages.get(n, 0.0) / plain_s,
                         "ray_s": None})
        rows.append({"stage": f"= {label}", "plain_s": sum(stages.get(n, 0.0) for n in names), "plain_%": None,
                     "ray_s": sum(shown.ray_phases.get(p, 0.0) for p in phase)})
    rows.append({"stage": "TOTAL (wall)", "plain_s": plain_s, "plain_%": 100.0, "ray_s": shown.ray_s})
    rows.append({"stage": "tokens/s", "plain_s": shown.tokens / plain_s, "plain_%": None,
                 "ray_s": shown.tokens / shown.ray_s})
    if shown_sc is not None:
        rows.append({"stage": "marginal tokens/s", "plain_s": shown_sc.marginal_tokens_per_s("plain"),
                     "plain_%": None, "ray_s": shown_sc.marginal_tokens_per_s("ray")})
        rows.append({"stage": "fixed cost per run (s)", "plain_s": shown_sc.fixed_s("plain"), "plain_%": None,
                     "ray_s": shown_sc.fixed_s("ray")})
    return rows


def _pair_note(i: int, p: Pair) -> str:
    cpu = (f"; machine-wide CPU-seconds (every process, other work included) Ray {p.ray_machine_cpu:.1f}, "
           f"plain {p.plain_machine_cpu:.1f}" if p.ray_machine_cpu is not None and p.plain_machine_cpu is not None
           else "")
    return (f"pair {i + 1}: Ray {p.ray_s:.1f}s, plain {p.plain_s:.1f}s (its CPU time {p.plain_cpu:.1f}s) -> "
            f"{p.speedup:.2f}x; 1-min load average after Ray {p.load_ray:.1f}, after plain {p.load_plain:.1f}{cpu}")


def _scaling_note(i: int, sc: Scaling, subset_every: int) -> str:
    head = (f"subset pair {i + 1} (1 file in {subset_every}, {sc.subset.tokens:,} tokens): "
            f"Ray {sc.subset.ray_s:.1f}s, plain {sc.subset.plain_s:.1f}s")
    if not sc.measurable:
        return head + "; no marginal rate (the full run was not slower than the subset run)"
    return (f"{head}; beyond the subset Ray {sc.marginal_tokens_per_s('ray'):,.0f} tokens/s, plain "
            f"{sc.marginal_tokens_per_s('plain'):,.0f} -> {sc.marginal_speedup:.2f}x; fixed cost per run "
            f"Ray {sc.fixed_s('ray'):.1f}s, plain {sc.fixed_s('plain'):.1f}s")


def _scaling_notes(scalings: list[Scaling], shown_sc: Scaling | None, subset_every: int) -> list[str]:
    notes = [_scaling_note(i, sc, subset_every) for i, sc in enumerate(scalings)]
    if shown_sc is not None:
        measured = [sc for sc in scalings if sc.measurable]
        notes.append(
            f"the marginal rows show subset pair {scalings.index(shown_sc) + 1}; marginal speedup, median of "
            f"{len(measured)}: {statistics.median(sc.marginal_speedup for sc in measured):.2f}x (tokens/s beyond "
            "the subset: what a larger corpus approaches as the fixed cost per run becomes a smaller share; "
            "the goal is the whole-run ratio)")
    return notes


def _setup_notes(cfg: PreprocessConfig, files: list[sources.InputFile], fingerprints: list[dict], tokens: int,
                 capacity: float) -> list[str]:
    n_bytes = sum(f["bytes"] for f in fingerprints)
    return ["both sides: one thread per process (TOKENIZERS_PARALLELISM=false); Ray warmed up first (a small run, then the read phase over all files)",
            "Ray stages documents in Parquet between phases A and D (bounded memory); the loop keeps them in memory",
            f"input: {len(files)} files, {n_bytes / 1e6:.1f} MB; {tokens:,} tokens on both sides; "
            f"seq_len={cfg.data.seq_len} vocab={cfg.data.vocab_size}; "
            f"tokenizer actors={cfg.runtime.tokenize_actors}",
            f"parallel capacity measured before the run: two processes got {capacity:.2f} cores' worth of CPU "
            f"(on {os.cpu_count()} cores shared with other work)"]


def run(args: list[str]) -> BenchResult:
    # One thread per process on both sides: the plain loop is one core, Ray spreads processes over
    # the cores. (Ray's tokenizer actors run with TOKENIZERS_PARALLELISM=false too, see ray_options.)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    ns, overrides = _parse_args(args)
    src = f"data.sources=[{{kind:stdlib,max_files:{ns.files}}}]" if ns.files else None
    cfg = compose_preprocess_config([*([src] if src else []), "tracking.enabled=false", *overrides])
    files, missing = sources.resolve_sources(cfg.data.sources)
    fingerprints = sources.fingerprint_files(files, missing, len(cfg.data.sources))
    capacity, pairs, scalings, scale = _measure(cfg, files, missing, fingerprints, ns)
    speedup = statistics.median(p.speedup for p in pairs)
    shown = _median_item(pairs, key=lambda p: p.speedup)
    measured = [sc for sc in scalings if sc.measurable]
    # The subset pair and full pair of the median marginal speedup.
    shown_sc = _median_item(measured, key=lambda sc: sc.marginal_speedup) if measured else None
    notes = [*_setup_notes(cfg, files, fingerprints, shown.tokens, capacity),
             *[_pair_note(i, p) for i, p in enumerate(pairs)],
             *_scaling_notes(scalings, shown_sc, ns.subset_every),
             f"the table shows pair {pairs.index(shown) + 1}; speedup (Ray tokens/s / plain tokens/s), median of "
             f"{len(pairs)} pair(s): {speedup:.2f}x"]
    rows, goals = _rows(shown, shown_sc), {"ray_vs_plain_tokens_per_s": Goal(speedup, TARGET)}
    if scale:
        scale_rows, scale_goals, scale_notes = _scale_rows(scale)
        rows, notes = rows + scale_rows, notes + scale_notes
        goals |= scale_goals
    return BenchResult(name="data", rows=rows, goals=goals, notes=notes)
