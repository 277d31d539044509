"""The training input pipeline (grain) and the one device-placement function.

    source -> min-size filter -> shuffle(seed) -> random crop/flip -> degrade -> repeat
           -> this process's shard -> per-host batch -> worker processes -> prefetch

Everything up to `repeat` is one deterministic global stream: element k is the same for any
number of processes or workers, because grain seeds each random transform from (seed, k, epoch).
Process p of P takes elements p, p+P, p+2P, ...; its worker w of W takes every W-th of those and
batches them. So every record appears once per epoch across all processes, and an iterator's
`get_state()` (small, JSON-serialisable) restored with `set_state()` continues with exactly the
batch that would have come next.

Batches are host-local numpy dicts: `"hr"` uint8 [B, S, S, 3], `"lq"` uint8 [B, S/s, S/s, 3],
`"label"` uint8 [B, S, S] (if the source has labels), `"index"` int64 [B] (source positions);
`to_global_arrays` turns them into global jax arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import cv2
import grain
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from segsr_jax import parallel
from segsr_jax.data.degradations import DegradationConfig, Degrade
from segsr_jax.data.transforms import CropConfig, MinSizeFilter, RandomCrop


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Input pipeline settings.

    Attributes:
      global_batch_size: examples per step over all processes; each process batches
        `global_batch_size / process count`.
      seed: seeds the shuffle and every random transform.
      num_epochs: passes over the data (None: forever).
      shuffle: shuffle the records (a new order every epoch).
      crop: crop / flip / resize / min-size settings; `crop.scale` must equal the degradation's.
      degradation: Real-ESRGAN parameters; None gives (HR, label) examples without `"lq"`.
      num_workers: worker processes (0: everything in this process).
      worker_buffer_size: batches each worker keeps ready.
      read_threads: threads per process (or per worker) that decode and transform elements;
        OpenCV and PIL release the GIL, so a second thread hides I/O and decode latency. 0
        reads synchronously: with worker processes that is the cheapest per core (the
        benchmark's setting), since the workers already overlap the work with training.
      read_buffer_size: elements those threads keep ready.
      prefetch_batches: batches a background thread of this process keeps ready (0: none).
      drop_remainder: drop a last partial batch (only happens with a finite `num_epochs`).
    """

    global_batch_size: int = 32
    seed: int = 0
    num_epochs: int | None = None
    shuffle: bool = True
    crop: CropConfig = CropConfig()
    degradation: DegradationConfig | None = DegradationConfig()
    num_workers: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 2
    read_buffer_size: int = 8
    prefetch_batches: int = 2
    drop_remainder: bool = True

    def __post_init__(self):
        if self.degradation is not None and self.degradation.scale != self.crop.scale:
            raise ValueError(
                f"crop.scale {self.crop.scale} != degradation.scale {self.degradation.scale}"
            )


def _mark_flags_parsed() -> None:
    # grain's worker processes read absl flags; a program that never parsed them (pytest, a
    # notebook, a non-absl entry point) would crash the workers with UnparsedFlagAccessError.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _init_worker(worker_index: int, worker_count: int) -> None:
    # One OpenCV thread per worker process: the workers are the parallelism; more threads
    # only oversubscribe the cores.
    del worker_index, worker_count
    cv2.setNumThreads(1)


def make_dataset(
    source: Sequence,
    config: PipelineConfig,
    *,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.IterDataset:
    """The batched training stream of this process.

    Args:
      source: a random-access source (`len`, `[i]` -> example dict or None), e.g.
        `ImageFolderSource`, `ArrayRecordSource`, `SyntheticSource`.
      config: pipeline settings.
      shard_index, shard_count: which share of the stream this process reads; default
        `jax.process_index()` / `jax.process_count()` (tests pass them to simulate hosts).
    Returns:
      a grain IterDataset of host-local batches; `iter()` it for a checkpointable iterator.
    """
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    if config.global_batch_size % shard_count:
        raise ValueError(
            f"global batch {config.global_batch_size} does not split over {shard_count} processes"
        )
    if len(source) == 0:
        raise ValueError("the source is empty")

    ds = grain.MapDataset.source(source).seed(config.seed)
    ds = ds.filter(MinSizeFilter(config.crop.min_size or config.crop.size))
    if config.shuffle:
        ds = ds.shuffle()
    ds = ds.random_map(RandomCrop(config.crop))
    if config.degradation is not None:
        ds = ds.random_map(Degrade(config.degradation))
    ds = ds.repeat(config.num_epochs)
    ds = ds[shard_index::shard_count]

    it = ds.to_iter_dataset(
        grain.ReadOptions(
            num_threads=config.read_threads, prefetch_buffer_size=config.read_buffer_size
        )
    )
    it = it.batch(config.global_batch_size // shard_count, drop_remainder=config.drop_remainder)
    if config.num_workers > 0:
        _mark_flags_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size
            ),
            worker_init_fn=_init_worker,
        )
    if config.prefetch_batches > 0:
        it = grain.experimental.ThreadPrefetchIterDataset(
            it, prefetch_buffer_size=config.prefetch_batches
        )
    return it


def to_global_arrays(batch, mesh: Mesh, spec: PartitionSpec):
    """Host-local batch (a pytree of numpy arrays, leading dim = this process's examples) ->
    global jax arrays sharded over `mesh` by `spec` (leading dim = the global batch).

    Every process must call this with its own share of the same step's batch; the global array
    is the processes' shares concatenated in process order. `spec` names the mesh axes of the
    leading dimension; trailing dimensions it does not mention are replicated.
    """
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(lambda x: parallel.global_array(x, sharding), batch)
