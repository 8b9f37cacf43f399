"""ti.atomic_max / ti.atomic_min reductions: Taichi 1.7.4's AD treats them as atomic adds in both
modes (silently wrong); kerndiff gives the winners the derivative, ties split evenly."""
import numpy as np
import pytest
import taichi as ti

import kerndiff as kd


pytestmark = pytest.mark.usefixtures("runtime")  # one f64 CPU runtime per module (conftest)


@pytest.fixture(scope="module")
def fields(runtime):
    x = ti.field(ti.f64, shape=8)
    m = ti.field(ti.f64, shape=3)
    s = ti.field(ti.f64, shape=())
    y = ti.field(ti.f64, shape=2)
    r = ti.field(ti.f64, shape=())
    x.from_numpy(np.array([0.3, 1.2, -0.5, 0.9, 2.0, 0.1, -1.0, 0.7]))
    return x, m, s, y, r


def test_max_and_min_reductions_orders_1_and_2(fields):
    x, m, s, _, _ = fields

    @kd.kernel
    def k():
        for i in x:
            v = ti.sin(x[i]) * x[i]
            ti.atomic_max(m[i % 3], v)
            ti.atomic_min(s[None], x[i] ** 2 - 1.0)

    assert kd.check_grad(k, [x], m, order=2) < 1e-7
    assert kd.check_grad(k, [x], s, order=2) < 1e-7
    xv = x.to_numpy()
    g = kd.backward(k, inputs=[x], output=s)([xv])[0]
    winner = np.argmin(xv ** 2)
    expected = np.zeros(8)
    expected[winner] = 2 * xv[winner]
    np.testing.assert_allclose(g, expected, rtol=1e-12)  # Taichi's AD would give 2 x_i everywhere


def test_ties_split_evenly_and_the_initial_value_can_win(fields):
    _, _, _, y, r = fields

    @kd.kernel
    def tie():
        for i in y:
            ti.atomic_max(r[None], y[i] * 2.0)

    grad = kd.backward(tie, inputs=[y], output=r)
    np.testing.assert_allclose(grad([np.array([1.0, 1.0])])[0], [1.0, 1.0])
    assert kd.forward(tie, inputs=[y], output=r)([np.array([1.0, 1.0])], tangents=[np.array([1.0, 3.0])]) == 4.0
    # all contributions below the initial value 0 (the factory clears outputs): nothing flows back
    np.testing.assert_allclose(grad([np.array([-1.0, -2.0])])[0], [0.0, 0.0])
