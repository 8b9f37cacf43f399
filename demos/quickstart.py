"""kerndiff in one minute: derivatives of device functions, of kernels, and Hessian-vector products.

    python demos/quickstart.py [--arch cpu|gpu]
"""
import argparse

import numpy as np
import taichi as ti

import kerndiff as kd
from common import init


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", choices=["cpu", "gpu"], default="cpu")
    args = parser.parse_args()
    init(args.arch, ti.f64, f64_math=True)

    # 1. Device functions: derivatives are device functions again.
    @kd.func
    def f(x):
        return x**3 + 2 * x**2 - 3 * x + 1

    dfdx = kd.forward(f)
    d2fdx2 = kd.forward(kd.forward(f))

    @kd.kernel
    def first() -> float:
        return dfdx(1.0)

    @kd.kernel
    def second() -> float:
        return d2fdx2(1.0)

    print(f"f'(1)  = {first()}   (expected 4)")
    print(f"f''(1) = {second()}  (expected 10)")
    assert first() == 4.0 and second() == 10.0

    # 2. Kernels: gradients, JVPs and Hessian-vector products as host functions.
    x1, x2, x3, y = (ti.field(float, shape=()) for _ in range(4))

    @kd.kernel
    def g():
        y[None] += x1[None] ** 3 + 2 * x2[None] ** 2 - 3 * x3[None] + 1

    grad = kd.backward(g, inputs=[x1, x2, x3], output=y)([1.0, 2.0, 3.0])
    jvp = kd.forward(g, inputs=[x1, x2, x3], output=y)([1.0, 2.0, 3.0], tangents=[1.0, 1.0, 0.0])
    hv = kd.hvp(g, inputs=[x1, x2, x3], output=y)([1.0, 2.0, 3.0], tangents=[1.0, 0.0, 0.0])
    print(f"gradient      = {grad}   (expected [3, 8, -3])")
    print(f"JVP [1,1,0]   = {jvp}   (expected 11)")
    print(f"H·[1,0,0]     = {hv}   (expected [6, 0, 0])")
    assert grad == [3.0, 8.0, -3.0] and jvp == 11.0 and hv == [6.0, 0.0, 0.0]

    # 3. A field kernel, its reverse kernel, and the generated source you can read.
    n = 8
    x = ti.field(float, shape=n, needs_grad=True)
    loss = ti.field(float, shape=(), needs_grad=True)
    x.from_numpy(np.linspace(0.0, 1.0, n))

    @kd.kernel
    def energy():
        for i in x:
            loss[None] += ti.sin(x[i]) ** 2

    with kd.Tape(loss):
        energy()
    expected = np.sin(2 * np.linspace(0.0, 1.0, n))
    print("d loss / dx   =", np.round(x.grad.to_numpy(), 6))
    assert np.allclose(x.grad.to_numpy(), expected)
    print("\nenergy.reverse.source:\n")
    print(energy.reverse.source)
    print("quickstart: all results as expected")


if __name__ == "__main__":
    main()
