"""Symbolic dimensions: integer polynomials over named sizes such as `batch_size` and `seq_len`.

A shape is a tuple of `int | Dim`. A `Dim` is a canonical sum of monomials, so `a*b == b*a` and
`(s + 1) - 1 == s`; a `Dim` that simplifies to a constant becomes a plain int. Turning a symbolic
dim into a Python int (`int(d)`, `range(d)`, `d > 1`) is a `ConcretizationError`, as in JAX: the size
is only known when the compiled model is specialized.
"""

from __future__ import annotations

from typing import Iterable, Union

from .errors import ConcretizationError, ShapeError, user_location

# A monomial is a sorted tuple of dim names (with repeats for powers); () is the constant term.
Monomial = tuple[str, ...]


class Dim:
    """A symbolic size: an immutable polynomial with integer coefficients over named dims."""

    __slots__ = ("terms", "_hash")

    def __init__(self, terms: dict[Monomial, int]):
        self.terms: tuple[tuple[Monomial, int], ...] = tuple(
            sorted(((m, c) for m, c in terms.items() if c != 0), key=lambda mc: (-len(mc[0]), mc[0]))
        )
        self._hash = hash(self.terms)

    @staticmethod
    def named(name: str) -> "Dim":
        if not name or not all(ch.isalnum() or ch in "_." for ch in name):
            raise ShapeError(f"a symbolic dim name must be an identifier-like string, got {name!r}",
                             location=user_location())
        return Dim({(name,): 1})

    @staticmethod
    def _make(terms: dict[Monomial, int]) -> "DimLike":
        d = Dim(terms)
        if not d.terms:
            return 0
        if len(d.terms) == 1 and d.terms[0][0] == ():
            return d.terms[0][1]
        return d

    @property
    def single_name(self) -> str | None:
        """The name when this dim is exactly one named size (`seq_len`, not `2*seq_len` or `a*b`)."""
        if len(self.terms) == 1 and self.terms[0][1] == 1 and len(self.terms[0][0]) == 1:
            return self.terms[0][0][0]
        return None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted({n for m, _ in self.terms for n in m}))

    # -- arithmetic -------------------------------------------------------------------------------
    def __add__(self, other: "DimLike") -> "DimLike":
        terms = dict(self.terms)
        for m, c in _as_terms(other):
            terms[m] = terms.get(m, 0) + c
        return Dim._make(terms)

    __radd__ = __add__

    def __neg__(self) -> "DimLike":
        return Dim._make({m: -c for m, c in self.terms})

    def __sub__(self, other: "DimLike") -> "DimLike":
        return self + (-_as_dim(other))

    def __rsub__(self, other: "DimLike") -> "DimLike":
        return (-self) + other

    def __mul__(self, other: "DimLike") -> "DimLike":
        terms: dict[Monomial, int] = {}
        for m1, c1 in self.terms:
            for m2, c2 in _as_terms(other):
                m = tuple(sorted(m1 + m2))
                terms[m] = terms.get(m, 0) + c1 * c2
        return Dim._make(terms)

    __rmul__ = __mul__

    def __truediv__(self, other: object) -> "DimLike":
        raise ShapeError(f"symbolic dim {self} / {other}: a size has no fractional value; use // for an exact "
                         "division", location=user_location())

    __rtruediv__ = __mod__ = __rmod__ = __truediv__

    def __float__(self) -> float:
        raise ConcretizationError(f"symbolic dim {self} has no concrete value while tracing",
                                  location=user_location())

    def __floordiv__(self, other: "DimLike") -> "DimLike":
        quotient = exact_divide(self, other)
        if quotient is not None:
            return quotient
        if isinstance(other, int) and not isinstance(other, bool) and other > 0:
            return floor_quotient(self, other)
        raise ShapeError(f"cannot divide symbolic dim {self} by {other}: a floor division needs a positive int "
                         "divisor, or a divisor that divides it exactly", location=user_location())

    # -- comparison -------------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if isinstance(other, Dim):
            return self.terms == other.terms
        return False  # a Dim is never a constant (those become ints)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return self._hash

    def _no_order(self, other: object):
        raise ConcretizationError(
            f"cannot compare symbolic dim {self} with {other}: its size is only known when the model is "
            "specialized; branch on static configuration instead", location=user_location()
        )

    __lt__ = __le__ = __gt__ = __ge__ = _no_order

    def __bool__(self) -> bool:
        return True  # a size-valued polynomial is nonzero; `if dim:` is a common "is present" test

    def __int__(self) -> int:
        raise ConcretizationError(
            f"symbolic dim {self} has no concrete value while tracing; keep it symbolic (qtrace "
            "primitives such as arange/full/reshape accept symbolic dims) or pass a concrete size",
            location=user_location()
        )

    __index__ = __int__

    def __repr__(self) -> str:
        return f"Dim({str(self)!r})"

    def __str__(self) -> str:
        parts = []
        for m, c in self.terms:
            body = "*".join(m)
            if not body:
                text = str(abs(c))
            elif abs(c) == 1:
                text = body
            else:
                text = f"{abs(c)}*{body}"
            if not parts:
                parts.append(text if c > 0 else "-" + text)
            else:
                parts.append(("+" if c > 0 else "-") + text)
        return "".join(parts)


DimLike = Union[int, Dim]

# Floor quotients `numerator // divisor` that are not polynomials (ceil(ctx_len / 7) is (ctx_len+6)//7)
# enter the polynomials as opaque names, "(ctx_len+6)//7", whose value follows from the numerator's
# names: this table keeps (numerator, divisor) by name. A name is its own definition, so one quotient
# made twice is one name.
_QUOTIENTS: dict[str, tuple[Dim, int]] = {}


def floor_quotient(numerator: Dim, divisor: int) -> Dim:
    name = f"({numerator})//{divisor}"
    _QUOTIENTS.setdefault(name, (numerator, divisor))
    return Dim({(name,): 1})


def quotient_of(name: str) -> tuple[Dim, int] | None:
    """(numerator, divisor) when `name` is a floor quotient, else None."""
    return _QUOTIENTS.get(name)


def _as_dim(value: DimLike) -> Dim:
    if isinstance(value, Dim):
        return value
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return Dim({(): int(value)})
    import numpy as np

    if isinstance(value, np.integer):
        return Dim({(): int(value)})
    raise ShapeError(f"expected a dimension (int or symbolic dim), got {value!r}", location=user_location())


def _as_terms(value: DimLike) -> tuple[tuple[Monomial, int], ...]:
    return _as_dim(value).terms


def exact_divide(numerator: DimLike, denominator: DimLike) -> DimLike | None:
    """numerator / denominator when it is an exact polynomial division by a monomial, else None."""
    num, den = _as_dim(numerator), _as_dim(denominator)
    if len(den.terms) != 1:
        return 1 if num == den else None
    den_mono, den_coef = den.terms[0]
    out: dict[Monomial, int] = {}
    for mono, coef in num.terms:
        rest = list(mono)
        for name in den_mono:
            if name not in rest:
                return None
            rest.remove(name)
        if coef % den_coef:
            return None
        out[tuple(rest)] = coef // den_coef
    return Dim._make(out) if out else 0


def canonical_dim(value: object) -> DimLike:
    """A user-written dim (int, numpy int, str name or Dim) as `int | Dim`."""
    if isinstance(value, Dim):
        return value
    if isinstance(value, str):
        return Dim.named(value)
    if isinstance(value, bool):
        raise ShapeError(f"a dimension cannot be a bool, got {value!r}", location=user_location())
    try:
        import operator

        size = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ShapeError(f"a dimension must be an int or a symbolic name, got {value!r}",
                         location=user_location()) from None
    if size < 0:
        raise ShapeError(f"a dimension cannot be negative, got {size}", location=user_location())
    return size


def canonical_shape(shape: Iterable[object]) -> tuple[DimLike, ...]:
    if isinstance(shape, (int, str, Dim)):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise ShapeError(f"a shape must be a tuple of ints and symbolic names, got {shape!r}",
                         location=user_location()) from None
    return tuple(canonical_dim(d) for d in dims)


def symbolic_names(value: object) -> set[str]:
    """The dim names inside a value that may be a Dim or a (nested) tuple, e.g. a reshape's shape."""
    if isinstance(value, Dim):
        return set(value.names)
    if isinstance(value, tuple):
        return set().union(*map(symbolic_names, value)) if value else set()
    return set()


def dim_product(dims: Iterable[DimLike]) -> DimLike:
    total: DimLike = 1
    for d in dims:
        total = total * d
    return total


def shape_str(shape: tuple[DimLike, ...]) -> str:
    return ",".join(str(d) for d in shape)


def substitute(dim: DimLike, sizes: dict[str, int]) -> int:
    """Evaluate a dim given concrete sizes for its names (KeyError names a missing one). A floor
    quotient is computed from its numerator's sizes, or, without them, taken from `sizes` itself
    (a function body sees the quotient as the size of one of its inputs)."""
    if not isinstance(dim, Dim):
        return dim
    total = 0
    for mono, coef in dim.terms:
        value = coef
        for name in mono:
            value *= _size_of(name, sizes)
        total += value
    return total


def _size_of(name: str, sizes: dict[str, int]) -> int:
    quotient = _QUOTIENTS.get(name)
    if quotient is not None:
        try:
            return substitute(quotient[0], sizes) // quotient[1]
        except KeyError:
            pass
    return sizes[name]
