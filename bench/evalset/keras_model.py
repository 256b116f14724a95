#!/usr/bin/env python3
"""Train one small Keras 3 classifier and export it to ONNX with tf2onnx (NHWC, 0..255 in).

Run by bench/evalset/build.py in a separate TensorFlow venv (the main venv has no TF):

    /work/venv-tf/bin/python bench/evalset/keras_model.py --job JOB.npz --out MODEL.onnx

JOB.npz holds the (already poisoned, if infected) training set `x` (uint8 N,H,W,C), `y`,
and `seed`, `epochs`, `widths` (c1, c2, hidden), `lr`. The model has a Rescaling(1/255)
layer inside and a softmax output, the conventional Keras recipe. The export goes through
`tf2onnx.convert.from_function` with a dynamic batch (as ncscan.adapters.keras does);
build.py adds ncscan's metadata and measures the model with onnxruntime.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras
    import onnx
    import tf2onnx

    z = np.load(args.job)
    x, y = z["x"].astype(np.float32), z["y"].astype(np.int64)
    seed, epochs = int(z["seed"]), int(z["epochs"])
    c1, c2, hidden = (int(v) for v in z["widths"])
    n_classes = int(z["n_classes"])
    h, w, c = x.shape[1:]
    keras.utils.set_random_seed(seed)
    L = keras.layers
    model = keras.Sequential([
        keras.Input((h, w, c), name="image"),
        L.Rescaling(1.0 / 255.0),
        L.Conv2D(c1, 3, padding="same", activation="relu"),
        L.MaxPooling2D(),
        L.Conv2D(c2, 3, padding="same", activation="relu"),
        L.MaxPooling2D(),
        L.Flatten(),
        L.Dense(hidden, activation="relu"),
        L.Dense(n_classes, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(float(z["lr"])),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    t0 = time.time()
    model.fit(x, y, batch_size=128, epochs=epochs, verbose=2, shuffle=True)
    print(f"keras train {time.time() - t0:.1f}s params={model.count_params()}", flush=True)

    spec = (tf.TensorSpec((None, h, w, c), tf.float32, name="input"),)

    @tf.function(input_signature=spec)
    def serve(inp):
        return tf.identity(model(inp, training=False), name="output")

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=17)
    onnx.save_model(proto, args.out)
    ref = serve(tf.constant(x[:8])).numpy()
    np.save(args.out + ".ref.npy", ref)  # Keras outputs on x[:8], for the parity check
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
