"""Backbone forward throughput on an accelerator, with and without mixed precision.

The GPU machines lent to this project carry PyTorch and JAX but no TensorFlow, so this
benchmark runs the Keras 3 model on whichever backend is available (KERAS_BACKEND=jax there,
tensorflow here) and measures the bare EfficientNet forward pass plus GeM pooling at the
benchmark's image sizes; the full tf.data extraction path is measured on the CPU by
benchmarks/extract_throughput.py.

  KERAS_BACKEND=jax python benchmarks/gpu_forward.py --sizes=512,1024 --batch_sizes=1,16
"""

import argparse
import json
import os
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="EfficientNetB1")
    parser.add_argument("--sizes", default="512,1024", help="longest sides (4:3 landscape)")
    parser.add_argument("--batch_sizes", default="1,16")
    parser.add_argument("--seconds", type=float, default=8.0, help="timing window per setting")
    parser.add_argument("--policies", default="float32,mixed_float16,mixed_bfloat16")
    parser.add_argument("--json", default="")
    args = parser.parse_args()

    import keras

    print(f"keras {keras.__version__}, backend {keras.backend.backend()}")
    if keras.backend.backend() == "jax":
        import jax

        print("devices:", jax.devices())
    rows = []
    for policy in args.policies.split(","):
        keras.mixed_precision.set_global_policy(policy)
        base = getattr(keras.applications, args.backbone)(include_top=False, weights=None)
        inp = keras.Input((None, None, 3))
        fmap = base(inp)
        # GeM (p = 3) in keras.ops, computed in float32 as the descriptor layers do.
        x = keras.ops.cast(fmap, "float32")
        gem = keras.ops.power(
            keras.ops.mean(keras.ops.power(keras.ops.maximum(x, 1e-6), 3.0), axis=(1, 2)),
            1.0 / 3.0,
        )
        model = keras.Model(inp, gem)
        for size in map(int, args.sizes.split(",")):
            h, w = (size * 3) // 4, size
            for bs in map(int, args.batch_sizes.split(",")):
                batch = np.random.default_rng(0).uniform(0, 255, (bs, h, w, 3)).astype("float32")
                fn = model.predict_on_batch
                fn(batch)  # compile
                fn(batch)
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < args.seconds:
                    out = fn(batch)
                    n += bs
                np.asarray(out)
                dt = time.perf_counter() - t0
                row = dict(policy=policy, size=f"{w}x{h}", batch=bs, images_per_s=round(n / dt, 1))
                rows.append(row)
                print(json.dumps(row), flush=True)
        keras.backend.clear_session()
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
