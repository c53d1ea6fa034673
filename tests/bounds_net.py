"""A small network that reaches every kernel family of the bundled models (direct and TF32 direct
convolutions forward and backward, direct weight gradients plain and gathered, batch norm, a residual
add, a max pool with its codes, split-K linears, Adam), for the AddressSanitizer check
(`graphconv check tests/bounds_net.py:build --bounds`), which builds every kernel anew."""
import graphconv as gc


def build():
    g = gc.Graph("bounds_net", "float32")
    x = g.input("x", ("N", 3, 12, 12))
    h = g.relu(g.batch_norm2d(g.conv2d(x, 16, 3, padding=1, bias=False, name="c1"), name="bn1"), name="r1")
    h2 = g.batch_norm2d(g.conv2d(h, 16, 3, padding=1, bias=False, name="c2"), name="bn2")
    h = g.relu(g.add(h2, h, name="add"), name="r2")
    h = g.max_pool2d(g.relu(g.conv2d(h, 24, 3, padding=1, name="c3"), name="r3"), 2, name="p3")
    h = g.max_pool2d(g.relu(g.conv2d(h, 32, 5, padding=2, name="c4"), name="r4"), 2, name="p4")
    h = g.relu(g.linear(g.flatten(h), 1100, name="fc1"), name="r5")
    g.output(g.linear(h, 10, name="fc2"))
    return g


def two_images_a_block():
    """8 x 8 planes: a Winograd block holds two images' 16 cells (an odd batch leaves half a block)."""
    g = gc.Graph("two_images", "float32")
    x = g.input("x", ("N", 8, 8, 8))
    h = g.max_pool2d(g.relu(g.conv2d(x, 32, 3, padding=1, name="conv")), 2)
    g.output(g.linear(g.flatten(h), 3, name="fc"))
    return g
