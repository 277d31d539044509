"""One process of a two-process CPU run of TrainCheckpointer (run by
test_checkpoint_multiprocess.py, not collected by pytest).

Usage: python checkpoint_worker.py PROCESS_ID PORT save|restore FOLDER

``save`` writes steps 3 and 6 (each process its part, and its own data state file);
``restore`` restores and prints one JSON line: the step, a value of the restored params, the
data iterator's next element and the steps then listed, or the error. With
FAIL_RESTORE=<process id> in the environment, that process's array reads always fail; with
FAIL_RESTORE_ONCE=<process id>, its first attempt fails.
"""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, port, mode, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

import grain  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from segsr_jax.training import checkpointer  # noqa: E402

REPLICATED = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("d",)), P())


def trees(seed):
    host = {
        "params": {"w": np.full((4, 3), seed, np.float32)},
        "ema_params": {"w": np.full((4, 3), seed / 2, np.float32)},
        "opt_state": {"m": np.full((5,), seed + 1, np.float32)},
        "train": {"step": np.int32(seed)},
    }
    return jax.tree.map(
        lambda a: jax.make_array_from_callback(a.shape, REPLICATED, lambda i: a[i]), host
    )


def data():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


ckpt = checkpointer.TrainCheckpointer(
    folder, checkpointer.CheckpointOptions(async_save=False), read_attempts=2, retry_delay_s=0
)
if mode == "save":
    it = data()
    for step in (3, 6):
        next(it)
        ckpt.save(step, **trees(step), data_iterator=it, config={"model": {}})
    out = {"saved": ckpt.all_steps()}
else:
    restore, failures = ckpt._mgr.restore, []

    def flaky(*args, **kwargs):
        if os.environ.get("FAIL_RESTORE") == str(process_id) or (
            os.environ.get("FAIL_RESTORE_ONCE") == str(process_id) and not failures
        ):
            failures.append(args[0])
            raise ValueError("UNAVAILABLE: injected read error")
        return restore(*args, **kwargs)

    ckpt._mgr.restore = flaky
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=REPLICATED), trees(0)
    )
    fresh, reports = data(), []
    try:
        step, items = ckpt.restore(target, fresh, report=reports.append)
        out = {
            "step": step,
            "w": float(np.asarray(items["params"]["w"].addressable_data(0))[0, 0]),
            "next": int(next(fresh)),
            "steps": ckpt.all_steps(),
        }
    except Exception as e:  # noqa: BLE001 - reported to the test
        out = {"error": f"{type(e).__name__}: {e}"}
    out["reports"] = reports
ckpt.close()
print(json.dumps({"process": process_id, **out}), flush=True)
jax.distributed.shutdown()
