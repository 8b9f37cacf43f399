"""The frontend's operator tables: Python's AST operators as the IR's operation names, how Python
evaluates each on compile-time values, and the atomic operations Taichi's ti.atomic_* name."""
from __future__ import annotations

import ast

import taichi as ti

BINOPS = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "div", ast.FloorDiv: "floordiv",
          ast.Mod: "mod", ast.Pow: "pow", ast.BitAnd: "bit_and", ast.BitOr: "bit_or", ast.BitXor: "bit_xor",
          ast.LShift: "shl", ast.RShift: "shr"}
CMPOPS = {ast.Lt: "lt", ast.LtE: "le", ast.Gt: "gt", ast.GtE: "ge", ast.Eq: "eq", ast.NotEq: "ne"}
PYOPS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
         "div": lambda a, b: a / b, "floordiv": lambda a, b: a // b, "mod": lambda a, b: a % b,
         "pow": lambda a, b: a ** b, "lt": lambda a, b: a < b, "le": lambda a, b: a <= b,
         "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b, "eq": lambda a, b: a == b,
         "ne": lambda a, b: a != b, "bit_and": lambda a, b: a & b, "bit_or": lambda a, b: a | b,
         "bit_xor": lambda a, b: a ^ b, "shl": lambda a, b: a << b, "shr": lambda a, b: a >> b}


# ti.atomic_* called as a statement: the IR's atomic operation (sub is add of the negation)
ATOMIC_OPS = {ti.atomic_add: "add", ti.atomic_sub: "sub", ti.atomic_max: "max", ti.atomic_min: "min",
              ti.atomic_and: "and", ti.atomic_or: "or", ti.atomic_xor: "xor"}
BIT_AUG_OPS = {"and": ast.BitAnd, "or": ast.BitOr, "xor": ast.BitXor}
