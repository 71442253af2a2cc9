"""benchmark/hlo.py reads what a compiled module does: the collectives and host transfers
the accelerator test relies on, seen in a small CPU program that has both."""
import jax
import jax.numpy as jnp
import numpy as np

from upm_jax import parallel
from upm_jax.benchmark import hlo


def test_summary_counts_collectives_host_callbacks_and_bytes():
    mesh = parallel.make_mesh()   # 8 CPU devices (conftest)

    def step(x):   # x [64, 32] sharded on rows
        jax.debug.callback(lambda v: None, x[0, 0])
        return jnp.sum(x, axis=0)   # [32]: a sum over the devices' rows

    x = jax.device_put(np.ones((64, 32), np.float32), parallel.batch_sharding(mesh))
    text = jax.jit(step, out_shardings=parallel.replicated(mesh)).lower(x).compile().as_text()
    stats = hlo.summary(text)
    assert stats["collectives"]["all-reduce"]["count"] >= 1
    assert ("f32", (32,)) in [s for shapes in stats["collectives"]["all-reduce"]["shapes"]
                              for s in shapes]
    assert any("callback" in k for k in stats["host_transfers"])
    plain = hlo.summary(jax.jit(lambda v: v * 2).lower(x).compile().as_text())
    assert plain["host_transfers"] == {}


def test_shape_bytes_of_tuples_and_scratch():
    assert hlo.shape_bytes("f32[16,64,32,8]{3,2,1,0}") == 16 * 64 * 32 * 8 * 4
    assert hlo.shape_bytes("(bf16[4,8]{1,0}, u8[1024]{0})") == 4 * 8 * 2 + 1024
    assert hlo.shape_bytes("(bf16[4,8]{1,0}, u8[1024]{0})", skip_scratch=True) == 4 * 8 * 2
