"""Sharded, atomic, asynchronous checkpoints at any fsspec URL (docs/design.md §5).

    <url>/<run>/step-<N>/model-fp<j>of<P>.safetensors   feature shard j of P: SAE rows + firing counters
                         optim-fp<j>of<P>.safetensors   Adam state of that shard
                         model-fp<j>of<P>-rows<i>of<R>.safetensors, optim-...   a shard over
                                                        checkpoint.max_file_mb: R files, each a range of
                                                        its latents' rows (and the replicated tensors)
                         part-dp<i>-fp<j>.json          what rank (i, j) wrote, and its data position
                         trainer_state.json             step, tokens, scale, data positions, RNG, config,
                                                        mesh and latent layout
                         manifest.json                  written LAST: every file's size and sha256, layout
    <url>/<run>/latest                                  name of the newest complete step

`save()` copies the state to host memory on the training thread and uploads it in a background thread
with retries (`sae_dist.storage`); a save that comes while the previous one is still uploading is skipped
(checkpoint.when_busy=skip, the default), so training never waits on storage. Only dp rank 0 of each feature shard writes weights (replicas are
identical); every other rank of dp 0 or fp 0 writes a small part file; rank 0 waits for those, then
writes the trainer state, the manifest and `latest`. A step without a readable manifest does not exist.
The save at the last step waits for its upload.

Loading reads safetensors and JSON only, checks every file against the manifest, and reshards: the rows
of the saved shards are concatenated along the latent dim and this rank's slice is taken, so a run saved
with fp=2 resumes with fp=1 or fp=4.

`check_storage(cfg)` runs at job start: a checkpoint URL (or cluster.cache_url, or cache) the job cannot
use stops it before its first step with a ConfigError naming the URL and the fix.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load

from sae_dist.config import Config, ConfigError, flatten
from sae_dist.snapshot import pack_safetensors
from sae_dist.storage import PermanentStorageError, Storage, StorageError, join, redact

log = logging.getLogger(__name__)

FORMAT = "sae-dist-ckpt-v2"
_STEP = re.compile(r"step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be used or written; the message names the file and what was wrong."""


def checkpoint_url(cfg: Config) -> str:
    """checkpoint.url, or <output dir>/checkpoints when it is empty."""
    return cfg.checkpoint.url or join(cfg.output_dir, "checkpoints")


def check_storage(cfg: Config) -> None:
    """Writes, reads back and deletes a small object under the checkpoint URL and under
    cluster.cache_url (when set), and reads data.cache_dir's train index (data.source=cache), all within
    checkpoint.probe_timeout_s. Call it once, on rank 0, before any training step: a store the job cannot
    use then stops it at once with a ConfigError naming the URL, the error and the fix, instead of after
    hours of training at its first checkpoint."""
    ck = cfg.checkpoint
    deadline = time.monotonic() + ck.probe_timeout_s
    url = checkpoint_url(cfg)
    endpoint = f"checkpoint.endpoint_url ({ck.endpoint_url!r})" if ck.endpoint_url else "AWS_ENDPOINT_URL"
    opts = (ck.storage_options, ck.endpoint_url, ck.op_timeout_s, ck.retry_initial_s, ck.retry_max_s)
    _check("checkpoint.url", url, endpoint, deadline, lambda store: store.probe(deadline), *opts)
    if cfg.cluster.cache_url:  # the producers' CacheWriter opens it with the AWS settings alone
        _check("cluster.cache_url", cfg.cluster.cache_url, "AWS_ENDPOINT_URL", deadline,
               lambda store: store.probe(deadline), {}, "", *opts[2:])
    if cfg.data.source == "cache":
        train = join(cfg.data.cache_dir, "train")

        def read_index(store: Storage) -> None:
            try:
                index = json.loads(store.get(join(store.root, "index.json"), deadline))
            except FileNotFoundError:
                raise ConfigError(
                    f"data.cache_dir ({redact(cfg.data.cache_dir)!r}) holds no train/index.json (missing or "
                    "incomplete cache); write one with `sae-dist cache data.cache_dir=...` first"
                ) from None
            except ValueError as err:
                raise ConfigError(
                    f"{redact(train)}/index.json is not JSON ({err}); re-create the cache with `sae-dist cache`"
                ) from err
            if not index.get("shards"):
                raise ConfigError(f"data.cache_dir ({redact(cfg.data.cache_dir)!r}) has no shards; write a non-empty cache")

        _check("data.cache_dir", train, "AWS_ENDPOINT_URL", deadline, read_index, {}, "", *opts[2:])


def _check(setting: str, url: str, endpoint: str, deadline: float, op: Callable[[Storage], None], *opts: Any) -> None:
    """Runs `op` on a Storage of `url`; storage errors become a ConfigError naming `setting`, the URL, the
    error and the fix."""
    where = f"{setting} ({redact(url)!r})"
    try:
        store = Storage(url, *opts)
    except (ImportError, ValueError) as err:  # fsspec: an unknown protocol or a missing filesystem package
        raise ConfigError(f"{where} cannot be opened: {type(err).__name__}: {err}") from err
    store.deadline_setting = "checkpoint.probe_timeout_s"
    try:
        op(store)
    except PermanentStorageError as err:
        raise ConfigError(f"{where} failed the storage check at job start: {err}") from err
    except (StorageError, FileNotFoundError) as err:
        remote = "" if store.local else f"the store at {endpoint} is up and reachable, "
        raise ConfigError(
            f"{where} failed the storage check at job start: {type(err).__name__}: {err}. Check that {remote}the "
            "URL is right, and raise checkpoint.probe_timeout_s for a store that answers slowly"
        ) from err


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def shard_file(kind: str, fp_rank: int, fp_size: int, piece: int = 0, pieces: int = 1) -> str:
    rows = f"-rows{piece}of{pieces}" if pieces > 1 else ""
    return f"{kind}-fp{fp_rank}of{fp_size}{rows}.safetensors"


def row_pieces(n_rows: int, row_bytes: int, max_bytes: int) -> list[tuple[int, int]]:
    """[a, b) row ranges that cut a shard of n_rows latents, row_bytes each, into files of at most
    max_bytes (one range if it fits, and never an empty one)."""
    count = max(1, min(n_rows, -(-n_rows * row_bytes // max_bytes)))
    return [(i * n_rows // count, (i + 1) * n_rows // count) for i in range(count)]


def shard_range(n_latents: int, fp_rank: int, fp_size: int) -> tuple[int, int]:
    """Latents [lo, hi) of feature shard `fp_rank` (docs/design.md §3)."""
    return fp_rank * n_latents // fp_size, (fp_rank + 1) * n_latents // fp_size


def _sharded_names(tensors: dict[str, torch.Tensor], n_local: int, replicated: tuple[str, ...]) -> list[str]:
    """Tensors split by latent rows: one row per local latent, not one of the SAE's replicated names (nor
    their optimizer state)."""
    return sorted(
        k for k, v in tensors.items() if v.dim() >= 1 and v.shape[0] == n_local and k.split(".")[0] not in replicated
    )


def _entry(data: bytes | bytearray) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@dataclass
class _Snapshot:
    """Everything one rank uploads for one step, already in host memory."""

    step: int
    step_dir: str
    files: dict[str, bytearray | Callable[[], bytearray]]
    """File name -> its bytes (safetensors), or a function that packs them when the upload is
    synchronous (one file in host memory at a time); empty on ranks that write no weights."""
    data: Any
    """This rank's data position."""
    state: dict[str, Any] | None
    """Rank 0: trainer_state.json without the data positions of the other replicas."""


class Checkpointer:
    """Saves and restores a Trainer from one mesh position. `rank` is the global rank; the fp/dp
    positions default to the mesh's fp-fastest layout (rank = dp_rank * fp + fp_rank) with the degrees
    of cfg.parallel. The parallel layer sets `gather(entries: dict) -> dict` (the union of every rank's
    dict, on every rank) and `barrier()`; both run on the training thread only, never on the upload
    thread."""

    def __init__(
        self,
        cfg: Config,
        rank: int = 0,
        world: int = 1,
        *,
        fp_rank: int | None = None,
        fp_size: int | None = None,
        dp_rank: int | None = None,
        dp_size: int | None = None,
        gather: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        barrier: Callable[[], None] | None = None,
    ) -> None:
        if fp_size is None or dp_size is None:
            p = cfg.parallel
            fp_size, dp_size = (p.fp, p.dp) if world > 1 else (1, 1)
        fp_rank = rank % fp_size if fp_rank is None else fp_rank
        dp_rank = rank // fp_size if dp_rank is None else dp_rank
        if (
            fp_size * dp_size != world
            or not (0 <= fp_rank < fp_size and 0 <= dp_rank < dp_size and 0 <= rank < world)
            or (rank == 0) != (fp_rank == 0 and dp_rank == 0)
        ):
            raise ValueError(
                f"mesh position rank={rank}/{world} fp={fp_rank}/{fp_size} dp={dp_rank}/{dp_size} is inconsistent: "
                "world must be fp_size * dp_size and rank 0 must be fp 0, dp 0"
            )
        ck = cfg.checkpoint
        self.cfg, self.rank, self.world = cfg, rank, world
        self.fp_rank, self.fp_size, self.dp_rank, self.dp_size = fp_rank, fp_size, dp_rank, dp_size
        self.store = self._open(checkpoint_url(cfg))
        self.fs = self.store.fs
        self.run_root = join(self.store.root, ck.run_name)
        self.gather: Callable[[dict[str, Any]], dict[str, Any]] = gather or (lambda entries: entries)
        self.barrier: Callable[[], None] = barrier or (lambda: None)
        self.last_saved: str | None = None
        """The newest step this process knows to be complete (rank 0: committed by it)."""
        self.last_blocking_s = 0.0
        """Seconds the last save() kept the training thread (the host copy, when uploads are async)."""
        self.skipped = 0
        """Saves skipped because the previous upload was still running."""
        self._config = flatten(cfg)  # slow (OmegaConf): once here, not on the training thread at every save
        self._thread: threading.Thread | None = None
        self._saved_step = -1
        self._failure: tuple[int, BaseException] | None = None

    def _open(self, url: str) -> Storage:
        ck = self.cfg.checkpoint
        return Storage(url, ck.storage_options, ck.endpoint_url, ck.op_timeout_s, ck.retry_initial_s, ck.retry_max_s)

    def _part_name(self, dp_rank: int, fp_rank: int) -> str:
        return f"part-dp{dp_rank}-fp{fp_rank}.json"

    def _expected_parts(self) -> list[str]:
        """Parts rank 0 waits for: the other weight writers (dp 0) and the other replicas' data (fp 0)."""
        return [self._part_name(0, j) for j in range(1, self.fp_size)] + [
            self._part_name(i, 0) for i in range(1, self.dp_size)
        ]

    def save(self, trainer: Any, deadline: float | None = None) -> str | None:
        """Snapshots the trainer and uploads it (in the background, except at the last step, which waits
        for its upload and every rank). Returns the step folder, or None if this save was skipped.

        With `deadline` (a time.monotonic value: a preemption's grace period) the save is synchronous on
        every rank: an upload still in flight is waited for, and this step's upload must end by then
        (else CheckpointError; the checkpoints before it stay as they were)."""
        t0 = time.perf_counter()
        final = deadline is not None or trainer.state.step >= getattr(trainer, "total_steps", float("inf"))
        if any(self.gather({f"busy{self.rank}": self._thread is not None and self._thread.is_alive()}).values()):
            if not final and self.cfg.checkpoint.when_busy == "skip":
                self.skipped += 1
                log.warning(
                    "checkpoint at step %d skipped: the one before is still uploading (storage slow or down)",
                    trainer.state.step,
                )
                return None
            self._join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if deadline is not None and self._saved_step == trainer.state.step:
            self.close()  # this very step was saved just before the signal: its upload has ended
            return self.last_saved
        snap = self._snapshot(trainer, lazy=not (self.cfg.checkpoint.async_upload and not final))
        self._saved_step = snap.step
        if self.cfg.checkpoint.async_upload and not final:
            self._thread = threading.Thread(target=self._upload, args=(snap,), name=f"checkpoint-{snap.step}",
                                            daemon=True)  # an exit mid-upload leaves the step invisible
            self._thread.start()
        else:
            self._upload(snap, deadline, inline=True)
        self.last_blocking_s = time.perf_counter() - t0
        if final:
            self.close()
        return snap.step_dir

    def _snapshot(self, trainer: Any, lazy: bool = False) -> _Snapshot:
        """The state to upload. `lazy` (synchronous uploads): the files are packed one at a time during
        the upload, from the live tensors, instead of copied to host memory all at once here."""
        sae, st = trainer.sae, trainer.state
        live = {"model": trainer.engine.weight_tensors() | {"tokens_since_fired": trainer.tokens_since_fired},
                "optim": trainer.engine.state_tensors()}  # ZeRO: a collective over dp (full per-shard state)
        sharded = {kind: _sharded_names(t, sae.n_local, sae.replicated_names()) for kind, t in live.items()}
        row_bytes = max(sum(t.numel() // t.shape[0] * t.element_size() for k, t in live[kind].items()
                            if k in sharded[kind] and t.shape[0]) for kind in live)
        max_bytes = max(1, int(self.cfg.checkpoint.max_file_mb * 2**20))

        def pieces(fp_rank: int) -> list[tuple[int, int]]:
            lo, hi = shard_range(sae.n_latents, fp_rank, self.fp_size)
            return row_pieces(hi - lo, row_bytes, max_bytes)

        files: dict[str, bytearray | Callable[[], bytearray]] = {}
        if self.dp_rank == 0:  # the host copy: the only part of a save the training thread waits for
            own = pieces(self.fp_rank)
            for i, (a, b) in enumerate(own):
                for kind, tensors in live.items():
                    part = {k: t[a:b] if k in sharded[kind] else t for k, t in tensors.items()}
                    name = shard_file(kind, self.fp_rank, self.fp_size, i, len(own))
                    files[name] = (lambda part=part: pack_safetensors(part)) if lazy else pack_safetensors(part)
        state = None
        if self.rank == 0:
            shards = []
            for j in range(self.fp_size):
                lo = shard_range(sae.n_latents, j, self.fp_size)[0]
                rows = pieces(j)
                shards += [{"fp_rank": j, "latents": [lo + a, lo + b],
                            "model": shard_file("model", j, self.fp_size, i, len(rows)),
                            "optim": shard_file("optim", j, self.fp_size, i, len(rows))}
                           for i, (a, b) in enumerate(rows)]
            layout = {
                "n_latents": sae.n_latents,
                "fp_size": self.fp_size,
                "dp_size": self.dp_size,
                "shards": shards,
                "sharded": sharded,
            }
            state = st.to_json() | {
                "config": self._config,
                "world": self.world,
                "torch_rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
                "layout": layout,
            }
            state = json.loads(json.dumps(state))
        return _Snapshot(st.step, join(self.run_root, step_name(st.step)), files, json.loads(json.dumps(st.data)), state)

    def _upload(self, snap: _Snapshot, deadline: float | None = None, inline: bool = False) -> None:
        """Runs on the upload thread, or `inline` on the training thread (synchronous saves). Failures are
        logged and kept for wait(); the step stays invisible.

        Inline, the ranks agree (a gather) once each has written its files and part, and rank 0 commits
        only if all of them did: a rank whose upload failed goes on to the next step's collectives, and
        rank 0 must not wait on its part until checkpoint.upload_timeout_s (an hour by default, beyond the
        process group's timeout). On the upload thread no collective may run; there rank 0 waits for the
        parts until the deadline while training goes on."""
        self._failure = None
        if deadline is None:
            deadline = time.monotonic() + self.cfg.checkpoint.upload_timeout_s
        failure: BaseException | None = None
        part: dict[str, Any] = {}
        try:
            files = {}
            for name, data in snap.files.items():
                data = data() if callable(data) else data
                self.store.put(join(snap.step_dir, name), data, deadline)
                files[name] = _entry(data)
                del data  # a lazily packed file leaves host memory before the next is packed
            part = {"step": snap.step, "mesh": [self.dp_size, self.fp_size], "dp_rank": self.dp_rank,
                    "fp_rank": self.fp_rank, "files": files, "data": snap.data}
            if self.rank != 0 and self._part_name(self.dp_rank, self.fp_rank) in self._expected_parts():
                self.store.put(join(snap.step_dir, self._part_name(self.dp_rank, self.fp_rank)),
                               json.dumps(part).encode(), deadline)
        except Exception as err:  # noqa: BLE001 - the upload thread must not die silently
            failure = err
        if inline and self.world > 1:
            ok = self.gather({f"ok{self.rank}": failure is None})
            failed = sorted(int(k[2:]) for k, v in ok.items() if not v and k != f"ok{self.rank}")
            if failure is None and failed:
                failure = CheckpointError(f"the upload of rank(s) {failed} failed")
        if failure is None and self.rank == 0:
            try:
                self._commit(snap, part, deadline)
            except Exception as err:  # noqa: BLE001
                failure = err
        if failure is not None:
            self._failure = (snap.step, failure)
            log.error("checkpoint %s failed and stays invisible: %s: %s", redact(snap.step_dir),
                      type(failure).__name__, failure)

    def _commit(self, snap: _Snapshot, own: dict[str, Any], deadline: float) -> None:
        parts = [own]
        for name in self._expected_parts():
            raw, wait = None, 0.05
            while raw is None:
                raw = self.store.get_if_exists(join(snap.step_dir, name), deadline)
                if raw is None:
                    if time.monotonic() + wait > deadline:
                        raise CheckpointError(f"{join(snap.step_dir, name)} never arrived (checkpoint.upload_timeout_s)")
                    time.sleep(wait)
                    wait = min(2 * wait, 2.0)
            part = json.loads(raw)
            if part["step"] != snap.step or part["mesh"] != [self.dp_size, self.fp_size]:
                raise CheckpointError(f"{join(snap.step_dir, name)} is from another save (step {part['step']}, mesh {part['mesh']})")
            parts.append(part | {"self": (name, _entry(raw))})
        files: dict[str, Any] = {}
        for part in parts:
            files |= part["files"]
            if "self" in part:
                files[part["self"][0]] = part["self"][1]
        assert snap.state is not None
        by_dp = {p["dp_rank"]: p["data"] for p in parts if p["fp_rank"] == 0}
        state = snap.state | {"data_by_dp": [by_dp[i] for i in range(self.dp_size)]}
        data = json.dumps(state, indent=1).encode()
        self.store.put(join(snap.step_dir, "trainer_state.json"), data, deadline)
        files["trainer_state.json"] = _entry(data)
        manifest = {"format": FORMAT, "step": snap.step, "layout": state["layout"], "files": files}
        self.store.put(join(snap.step_dir, "manifest.json"), json.dumps(manifest, indent=1).encode(), deadline)
        self.store.put(join(self.run_root, "latest"), step_name(snap.step).encode(), deadline)
        self.last_saved = self.store.unstrip(snap.step_dir)
        log.info("checkpoint %s complete", redact(self.last_saved))
        self.prune(deadline)

    def _join(self, timeout: float | None) -> None:
        ck = self.cfg.checkpoint
        limit = timeout if timeout is not None else ck.upload_timeout_s + ck.op_timeout_s
        if self._thread is not None:
            self._thread.join(limit)
            if self._thread.is_alive():
                raise CheckpointError(
                    f"waited {limit:.0f}s for the upload of checkpoint {self._thread.name} and it is still "
                    "running; raise checkpoint.upload_timeout_s or check the storage"
                )

    def wait(self, timeout: float | None = None) -> None:
        """Blocks until this rank's last upload ended; raises CheckpointError if it failed."""
        self._join(timeout)
        if self._failure is not None:
            step, err = self._failure
            raise CheckpointError(f"checkpoint of step {step} was not written: {type(err).__name__}: {err}") from err

    def close(self) -> None:
        """wait(), then a barrier: on return every rank's upload has ended."""
        self.wait()
        self.barrier()

    def complete_steps(self, run_root: str | None = None, store: Storage | None = None) -> list[tuple[int, str]]:
        """(step, folder) of every step with a readable manifest, oldest first."""
        return [(s, p) for s, p, ok in sorted(self._scan(store or self.store, run_root or self.run_root)) if ok]

    def _scan(self, store: Storage, root: str) -> list[tuple[int, str, bool]]:
        out = []
        for path in store.list_dirs(root):
            m = _STEP.search(path)
            if m:
                raw = store.get_if_exists(join(path, "manifest.json"))
                out.append((int(m.group(1)), path, raw is not None and _valid_manifest(raw)))
        return out

    def prune(self, deadline: float | None = None) -> None:
        """Retention: keep the newest keep_last complete steps and every keep_every-th; drop incomplete
        steps older than the newest complete one (left by killed runs)."""
        ck = self.cfg.checkpoint
        scan = sorted(self._scan(self.store, self.run_root))
        complete = [s for s, _, ok in scan if ok]
        keep = set(complete[-ck.keep_last :])
        for step, path, ok in scan:
            stale = not ok and complete and step < complete[-1]
            if (ok and step not in keep and not (ck.keep_every and step % ck.keep_every == 0)) or stale:
                self.store.remove_tree(path, deadline)

    def resolve(self, resume_from: str) -> str | None:
        """The step folder (a URL, or a path on the local disk) to resume from, or None when `latest`
        finds none yet. Every rank gets rank 0's answer."""
        store, root = (self.store, self.run_root) if resume_from == "latest" else self._locate(resume_from)
        found: str | None = None
        if self.rank == 0:
            if _STEP.search(root):
                if store.get_if_exists(join(root, "manifest.json")) is None:
                    raise ConfigError(
                        f"checkpoint.resume_from ({redact(resume_from)!r}) has no manifest.json: the step is "
                        "incomplete; point at the run folder to take the newest complete step"
                    )
                found = store.unstrip(root)
            else:
                steps = self.complete_steps(root, store)
                if steps:
                    found = store.unstrip(steps[-1][1])
                elif resume_from != "latest":
                    raise ConfigError(
                        f"checkpoint.resume_from ({redact(resume_from)!r}) holds no complete step; check the URL"
                    )
        return self.gather({"resume_from": found} if self.rank == 0 else {})["resume_from"]

    def _locate(self, url: str) -> tuple[Storage, str]:
        store = self._open(url)
        return store, store.root.rstrip("/")

    def _read_verified(self, store: Storage, step_dir: str, name: str, manifest: dict[str, Any]) -> bytes:
        where = f"{redact(store.unstrip(step_dir))}/{name}"
        entry = manifest["files"].get(name)
        if entry is None:
            raise CheckpointError(f"{where} is not listed in the manifest")
        data = store.get(join(step_dir, name))
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(
                f"{where} does not match its manifest checksum (corrupt or partly written); "
                "delete that step folder to resume from the one before"
            )
        return data

    def _read_rows(self, store: Storage, step_dir: str, manifest: dict[str, Any], kind: str, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """This rank's latents [lo, hi) of `kind` (model or optim), cut from whichever saved shards hold
        them; replicated tensors from the first of those shards."""
        layout = manifest["layout"]
        sharded = set(layout["sharded"][kind])
        pieces: dict[str, list[torch.Tensor]] = {}
        for shard in layout["shards"]:
            s_lo, s_hi = shard["latents"]
            if s_hi <= lo or s_lo >= hi:
                continue
            data = self._read_verified(store, step_dir, shard[kind], manifest)
            try:
                tensors = st_load(data)
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                where = f"{redact(store.unstrip(step_dir))}/{shard[kind]}"
                raise CheckpointError(f"{where} is not a readable safetensors file: {err}") from err
            del data
            for name, t in tensors.items():
                if name in sharded:
                    pieces.setdefault(name, []).append(t[max(lo, s_lo) - s_lo : min(hi, s_hi) - s_lo])
                elif name not in pieces:
                    pieces[name] = [t]
            del tensors
        out = {}
        for name in list(pieces):  # one tensor at a time: its pieces are freed as it is joined
            ts = pieces.pop(name)
            out[name] = ts[0] if len(ts) == 1 else torch.cat(ts)
            del ts
        return out

    def load(self, trainer: Any, step_dir: str) -> None:
        """Restores `trainer` (this rank's shard) from a step folder given by resolve()."""
        store, path = self._locate(step_dir)
        raw = store.get_if_exists(join(path, "manifest.json"))
        if raw is None or not _valid_manifest(raw):
            raise CheckpointError(f"{redact(step_dir)}/manifest.json is missing or not a {FORMAT} manifest")
        manifest = json.loads(raw)
        state = json.loads(self._read_verified(store, path, "trainer_state.json", manifest))
        layout = manifest["layout"]
        sae = trainer.sae
        if layout["n_latents"] != sae.n_latents:
            raise CheckpointError(
                f"{redact(step_dir)} holds n_latents={layout['n_latents']} but sae.n_latents is {sae.n_latents}"
            )
        lo, hi = shard_range(sae.n_latents, self.fp_rank, self.fp_size)
        if hi - lo != sae.n_local:
            raise CheckpointError(f"this rank's SAE has {sae.n_local} latents, the fp={self.fp_size} layout gives {hi - lo}")
        if layout["fp_size"] != self.fp_size:
            log.info("resharding %s: fp %d -> %d, rank %d takes latents [%d, %d)",
                     redact(step_dir), layout["fp_size"], self.fp_size, self.rank, lo, hi)
        model = self._read_rows(store, path, manifest, "model", lo, hi)
        trainer.tokens_since_fired.copy_(model.pop("tokens_since_fired"))
        trainer.engine.load_weights(model)  # ZeRO: into its fp32 masters too
        trainer.load_optimizer_state(self._read_rows(store, path, manifest, "optim", lo, hi))
        st = trainer.state
        st.step, st.tokens, st.scale, st.seed = state["step"], state["tokens"], state["scale"], state["seed"]
        by_dp = state["data_by_dp"]
        if len(by_dp) != self.dp_size:
            log.warning("resuming dp=%d from a dp=%d checkpoint: replica %d continues replica %d's data position, "
                        "so the data order differs from an uninterrupted run", self.dp_size, len(by_dp),
                        self.dp_rank, self.dp_rank % len(by_dp))
        st.data = by_dp[self.dp_rank % len(by_dp)]
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch_rng"])), dtype=torch.uint8))
        self.last_saved = step_dir
        if self.rank == 0 and store.fs is self.store.fs and path.rsplit("/", 1)[0] == self.run_root:
            for step, other, ok in self._scan(self.store, self.run_root):
                if not ok and step > st.step:  # a killed save's leftovers: its parts must not join a new save
                    self.store.remove_tree(other)
        log.info("resumed from %s (step %d)", redact(step_dir), st.step)


def _valid_manifest(raw: bytes) -> bool:
    try:
        manifest = json.loads(raw)
    except ValueError:
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT and "files" in manifest
