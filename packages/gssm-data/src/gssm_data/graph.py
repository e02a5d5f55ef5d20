"""The graph spec: which nodes exist, their sizes, parents, kernels and modes.

A GSSM is a directed acyclic graph of discrete nodes. Exactly one node is
observed (its states are the token vocabulary); the others are latent. At t = 0
every node is in state 0; from t = 1 on, a node is drawn from
p(z_t | z_{t-1} (latent nodes only), parents_t), parents first (topological
order). See docs/design.md, section GSSM semantics.

Everything here is validation and structure; no randomness.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gssm_data.common.humanize import format_validation_error
from gssm_data.common.yamlfile import load_yaml_file
from gssm_data.errors import GssmDataError

KernelKind = Literal["product", "fullrank"]
Mode = Literal["default", "transition", "slow", "dead"]
MODES: tuple[str, ...] = ("default", "transition", "slow", "dead")

# Largest table (inputs x next states) one node may have: keeps a typo such as
# `states: 100000` from allocating gigabytes before anything else is checked.
MAX_TABLE_ENTRIES = 50_000_000


class NodeSpec(BaseModel):
    """One node of the graph."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
    states: Annotated[int, Field(gt=0, description="cardinality of the node")]
    alpha: Annotated[
        float,
        Field(gt=0, allow_inf_nan=False, description="Dirichlet concentration (small = peaked)"),
    ]
    parents: tuple[str, ...] = ()
    kernel: KernelKind = "product"
    mode: Mode = "default"
    observed: bool = False
    c: Annotated[int, Field(ge=0, description="absorbing state of a `dead` node")] = 0

    @field_validator("mode", mode="before")
    @classmethod
    def _none_is_default(cls, value: object) -> object:
        # The upstream configs write `none`; accept it as an alias.
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return "default"
        return value

    @model_validator(mode="after")
    def _check_node(self) -> NodeSpec:
        if self.observed and self.mode in ("slow", "dead"):
            raise ValueError(
                f"node {self.name!r}: mode {self.mode!r} applies to latent nodes only; "
                "the observed node must be 'default' or 'transition'"
            )
        if self.mode == "dead" and self.c >= self.states:
            raise ValueError(
                f"node {self.name!r}: absorbing state c={self.c} is out of range "
                f"for {self.states} states"
            )
        twice = sorted({parent for parent in self.parents if self.parents.count(parent) > 1})
        if twice:
            raise ValueError(f"node {self.name!r}: parent(s) listed twice: {', '.join(twice)}")
        if self.name in self.parents:
            raise ValueError(
                f"node {self.name!r} lists itself as a parent; a latent node already "
                "depends on its own previous state"
            )
        return self


class GraphSpec(BaseModel):
    """A validated graph: unique names, one observed node, known parents, no cycle."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    nodes: tuple[NodeSpec, ...] = Field(min_length=1)
    description: str = ""

    @model_validator(mode="after")
    def _check_graph(self) -> GraphSpec:
        names = [node.name for node in self.nodes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate node names: {', '.join(duplicates)}")
        observed = [node.name for node in self.nodes if node.observed]
        if len(observed) != 1:
            found = ", ".join(observed) if observed else "none"
            raise ValueError(f"exactly one node must be observed (observed: true); found {found}")
        known = set(names)
        for node in self.nodes:
            unknown = [parent for parent in node.parents if parent not in known]
            if unknown:
                raise ValueError(
                    f"node {node.name!r} has unknown parent(s) {', '.join(unknown)}; "
                    f"known nodes: {', '.join(names)}"
                )
        _topological_order(self.nodes)  # raises on a cycle
        for node in self.nodes:
            entries = node.states
            for parent in node.parents:
                entries *= self.node(parent).states
            if not node.observed:
                entries *= node.states
            if entries > MAX_TABLE_ENTRIES:
                raise ValueError(
                    f"node {node.name!r}: its conditional table would have {entries:,} "
                    f"entries (limit {MAX_TABLE_ENTRIES:,}); use fewer states or parents"
                )
        return self

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    @cached_property
    def order(self) -> tuple[NodeSpec, ...]:
        """Nodes in topological order: parents before children (update order)."""
        return _topological_order(self.nodes)

    @property
    def observed(self) -> NodeSpec:
        return next(node for node in self.nodes if node.observed)

    @property
    def latents(self) -> tuple[NodeSpec, ...]:
        """Latent nodes in topological order."""
        return tuple(node for node in self.order if not node.observed)

    @property
    def vocab_size(self) -> int:
        return self.observed.states

    @property
    def joint_latent_states(self) -> int:
        size = 1
        for node in self.latents:
            size *= node.states
        return size

    def input_sizes(self, name: str) -> tuple[int, ...]:
        """Sizes of a node's inputs, in table-axis order: self (latent only), parents."""
        node = self.node(name)
        sizes = [] if node.observed else [node.states]
        sizes.extend(self.node(parent).states for parent in node.parents)
        return tuple(sizes)

    def table_shape(self, name: str) -> tuple[int, ...]:
        """Shape of a node's conditional table p(z_t | inputs): inputs, then next state."""
        return (*self.input_sizes(name), self.node(name).states)

    def with_mode(self, mode: str) -> GraphSpec:
        """The same graph with every latent node set to `mode` (the `--mode` flag).

        The observed node keeps its mode: `slow` and `dead` apply to latents only.
        A bad mode, or one a node cannot take (`dead` with c out of range), is a
        GssmDataError.
        """
        if mode.lower() != "none" and mode not in MODES:
            raise GssmDataError(
                f"unknown mode {mode!r}; choose one of {', '.join(MODES)} (none = default)"
            )
        return self._replace_nodes(
            lambda node: {} if node.observed else {"mode": mode}, source=f"graph with mode {mode}"
        )

    def with_alpha(self, alpha: float, *, target: Literal["latent", "observed"]) -> GraphSpec:
        """The same graph with the Dirichlet concentration of the `target` nodes replaced."""
        if target not in ("latent", "observed"):
            raise GssmDataError(f"unknown alpha target {target!r}; choose latent or observed")
        return self._replace_nodes(
            lambda node: {"alpha": alpha} if node.observed == (target == "observed") else {},
            source=f"graph with alpha {alpha}",
        )

    def _replace_nodes(
        self, update: Callable[[NodeSpec], dict[str, object]], *, source: str
    ) -> GraphSpec:
        """Revalidate the graph with some node fields changed (validators run again)."""
        nodes = [{**node.model_dump(), **update(node)} for node in self.nodes]
        return parse_graph({"nodes": nodes, "description": self.description}, source=source)

    @property
    def has_transition(self) -> bool:
        return any(node.mode == "transition" for node in self.nodes)


def _topological_order(nodes: tuple[NodeSpec, ...]) -> tuple[NodeSpec, ...]:
    """Kahn's algorithm, stable in declaration order; a cycle is a user error.

    Every round removes at least one node or stops, so it ends after at most
    len(nodes) rounds whatever the graph (the upstream code looped forever on a
    cycle).
    """
    by_name = {node.name: node for node in nodes}
    remaining = {node.name: set(node.parents) & by_name.keys() for node in nodes}
    order: list[NodeSpec] = []
    while remaining:
        ready = [name for name, parents in remaining.items() if not parents]
        if not ready:
            cycle = _find_cycle(remaining)
            shown = cycle if len(cycle) <= 9 else [*cycle[:8], "...", cycle[-1]]
            raise ValueError(
                f"the graph has a cycle of {len(cycle) - 1} node(s) (parent -> child): "
                + " -> ".join(shown)
            )
        for name in ready:
            order.append(by_name[name])
            del remaining[name]
        for parents in remaining.values():
            parents.difference_update(ready)
    return tuple(order)


def _find_cycle(parents: dict[str, set[str]]) -> list[str]:
    """One cycle, listed parent -> child, among nodes that all still have parents left.

    Walking from child to any remaining parent never gets stuck (each one has a
    parent in the set), so a name repeats within len(parents) + 1 steps.
    """
    name = min(parents)
    path: list[str] = []
    seen: dict[str, int] = {}
    while name not in seen:
        seen[name] = len(path)
        path.append(name)
        name = min(parents[name])
    return [*path[seen[name] :], name][::-1]


def parse_graph(data: object, *, source: str = "graph") -> GraphSpec:
    """Validate a mapping as a GraphSpec, turning pydantic errors into one clear line."""
    try:
        return GraphSpec.model_validate(data)
    except ValidationError as error:
        raise GssmDataError(f"invalid {source}: {format_validation_error(error)}") from None


def load_graph(path: str | Path) -> GraphSpec:
    """Load a graph spec from a YAML file (a mapping with a `nodes` list).

    The file is read through :mod:`gssm_data.common.yamlfile`: size and nesting are
    bounded and non-finite numbers refused before validation.
    """
    path = Path(path)
    data = load_yaml_file(path, what="graph file")
    if not isinstance(data, dict):
        raise GssmDataError(
            f"{path} must hold a mapping with a `nodes` list, got {type(data).__name__}"
        )
    return parse_graph(data, source=f"graph {path}")
