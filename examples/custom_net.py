"""A user model for the command line: `graphconv summary examples/custom_net.py:build`.

A small residual network on 1x28x28 digits whose activation is defined by a sympy expression
(the GELU tanh approximation); its gradient comes from sympy.diff.
"""
import sympy as sp

import graphconv as gc

x = sp.Symbol("x")
gc.define_activation("gelu_tanh", x / 2 * (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (x + sp.Rational(44715, 1000000) * x**3))))


def build():
    g = gc.Graph("custom_net")
    h = g.input("x", ("N", 1, 28, 28))
    h = g.activation(g.batch_norm2d(g.conv2d(h, 16, 3, padding=1, bias=False, name="stem")), "gelu_tanh")
    branch = g.conv2d(g.activation(h, "gelu_tanh"), 16, 3, padding=1, name="res_conv")
    h = g.max_pool2d(g.add(h, branch, name="res_add"), 2)                          # 16 x 14 x 14
    h = g.activation(g.conv2d(h, 32, 3, stride=2, padding=1, name="down"), "gelu_tanh")   # 32 x 7 x 7
    g.output(g.linear(g.flatten(h), 10, name="fc"))
    return g
