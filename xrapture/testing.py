"""Checks for code that runs on LoraWeights: no dense product, dense equivalence.

``assert_no_dense_product(fn, *args)`` proves that no ``M×N`` weight-sized
product appears in ``fn``'s jaxpr (recursively) or compiled HLO;
``assert_matches_dense(fn, x, lora)`` compares outputs and gradients with the
same function run on the hand-built dense weight.
"""

from xrapture._src.testing.dense_check import assert_no_dense_product
from xrapture._src.testing.dense_check import find_dense_products
from xrapture._src.testing.dense_check import find_dense_products_in_hlo
from xrapture._src.testing.dense_check import find_dense_products_in_hlo_text
from xrapture._src.testing.dense_check import find_dense_products_in_jaxpr
from xrapture._src.testing.dense_check import weight_shapes
from xrapture._src.testing.reference import assert_matches_dense
from xrapture._src.testing.reference import dense_value

__all__ = (
    "assert_matches_dense",
    "assert_no_dense_product",
    "dense_value",
    "find_dense_products",
    "find_dense_products_in_hlo",
    "find_dense_products_in_hlo_text",
    "find_dense_products_in_jaxpr",
    "weight_shapes",
)
