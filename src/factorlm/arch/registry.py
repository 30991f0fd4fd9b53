"""Architecture knowledge as data, keyed by ``config.model_type``.

Each :class:`ArchSpec` says where the decoder blocks are and which linear layers every block has,
grouped by sub-layer (``attn``, ``mlp``, ``ssm``) and by role (``q``, ``k``, ``v``, ``o``, ``gate``,
``up``, ``down``...). Patterns are dotted paths relative to one block; ``*`` matches one path
component (an expert index). No algorithm ever looks at a model's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MLPUnit:
    """Linear layers that share one intermediate dimension (for structured channel pruning).

    ``inputs`` produce the intermediate channels (their output rows are pruned), ``output`` consumes
    them (its input columns are pruned). ``fused_gate_up`` marks a single linear whose output rows
    are [gate; up] halves (phi3), pruned symmetrically.
    """

    inputs: tuple[str, ...]
    output: str
    fused_gate_up: bool = False


@dataclass(frozen=True)
class ArchSpec:
    blocks: str
    groups: dict[str, tuple[str, ...]]
    roles: dict[str, str] = field(default_factory=dict)
    mlp_units: tuple[MLPUnit, ...] = ()
    fused_experts: tuple[str, ...] = ()  # paths of fused 3D-parameter expert modules to unfuse
    # each targeted linear is called exactly once per block forward, in one order, for every batch
    # (no token routing, no weight read without a call): the one-pass pipeline applies
    single_pass: bool = True
    final_norm: str | None = None
    embed: str | None = None
    # config key of the MLP width (one value for every block) in the plain architecture's config
    mlp_width_key: str | None = "intermediate_size"
    # linears called on the very same input tensor in a block forward (q/k/v, gate/up): at
    # inference their first factors run as one stacked matmul (:mod:`factorlm.nn.fused`)
    shared_inputs: tuple[tuple[str, ...], ...] = ()
    # patterns of linears whose tokens depend on routing (MoE experts): the dense and the
    # compressed stream send them different tokens
    routed: tuple[str, ...] = ()
    # attention as modules (factorlm.arch.heads): whether q/k are rotated by RoPE in transformers'
    # half-split layout (pairs i, i + rotary/2 of each head; the rotary share of a head from the
    # config's partial_rotary_factor), and the per-head norms on q/k that forbid removing q/k
    # dimensions (they normalise over the whole head)
    rope: bool = True
    qk_norms: tuple[str, ...] = (
        "self_attn.q_norm",
        "self_attn.k_norm",
        "self_attn.q_layernorm",
        "self_attn.k_layernorm",
    )

    def patterns(self) -> tuple[str, ...]:
        return tuple(p for group in self.groups.values() for p in group)

    def group_of(self, rel_name: str) -> str:
        from factorlm.arch.match import match

        for g, pats in self.groups.items():
            if any(match(p, rel_name) for p in pats):
                return g
        return "other"

    def role_of(self, rel_name: str) -> str | None:
        from factorlm.arch.match import match

        for role, pat in self.roles.items():
            if match(pat, rel_name):
                return role
        return None


_LLAMA_ROLES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}

LLAMA = ArchSpec(
    blocks="model.layers",
    groups={
        "attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    },
    roles=_LLAMA_ROLES,
    mlp_units=(MLPUnit(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),),
    shared_inputs=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("mlp.gate_proj", "mlp.up_proj"),
    ),
    final_norm="model.norm",
    embed="model.embed_tokens",
)

PHI3 = ArchSpec(
    blocks="model.layers",
    groups={
        "attn": ("self_attn.qkv_proj", "self_attn.o_proj"),
        "mlp": ("mlp.gate_up_proj", "mlp.down_proj"),
    },
    roles={
        "qkv": "self_attn.qkv_proj",
        "o": "self_attn.o_proj",
        "gate_up": "mlp.gate_up_proj",
        "down": "mlp.down_proj",
    },
    mlp_units=(MLPUnit(("mlp.gate_up_proj",), "mlp.down_proj", fused_gate_up=True),),
    final_norm="model.norm",
    embed="model.embed_tokens",
)

PHI = ArchSpec(
    blocks="model.layers",
    groups={
        "attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"),
        "mlp": ("mlp.fc1", "mlp.fc2"),
    },
    roles={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.dense",
        "up": "mlp.fc1",
        "down": "mlp.fc2",
    },
    mlp_units=(MLPUnit(("mlp.fc1",), "mlp.fc2"),),
    shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),),
    final_norm="model.final_layernorm",
    embed="model.embed_tokens",
)

GPT2 = ArchSpec(
    blocks="transformer.h",
    groups={"attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")},
    roles={"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
    mlp_units=(MLPUnit(("mlp.c_fc",), "mlp.c_proj"),),
    final_norm="transformer.ln_f",
    embed="transformer.wte",
    mlp_width_key="n_inner",
)

OPT = ArchSpec(
    blocks="model.decoder.layers",
    groups={
        "attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
        "mlp": ("fc1", "fc2"),
    },
    roles={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.out_proj",
        "up": "fc1",
        "down": "fc2",
    },
    mlp_units=(MLPUnit(("fc1",), "fc2"),),
    shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),),
    final_norm="model.decoder.final_layer_norm",
    embed="model.decoder.embed_tokens",
    mlp_width_key="ffn_dim",
    rope=False,  # learned absolute positions
)

MIXTRAL = ArchSpec(
    blocks="model.layers",
    groups={
        "attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        "mlp": ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.experts.*.down_proj"),
    },
    roles={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.experts.*.gate_proj",
        "up": "mlp.experts.*.up_proj",
        "down": "mlp.experts.*.down_proj",
    },
    mlp_units=(
        MLPUnit(("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"), "mlp.experts.*.down_proj"),
    ),
    fused_experts=("mlp.experts",),
    shared_inputs=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"),
    ),
    routed=("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.experts.*.down_proj"),
    single_pass=False,  # tokens are routed: an expert may see no token of a batch
    final_norm="model.norm",
    embed="model.embed_tokens",
)

MAMBA = ArchSpec(
    blocks="backbone.layers",
    groups={"ssm": ("mixer.in_proj", "mixer.x_proj", "mixer.dt_proj", "mixer.out_proj")},
    roles={
        "in": "mixer.in_proj",
        "x": "mixer.x_proj",
        "dt": "mixer.dt_proj",
        "out": "mixer.out_proj",
    },
    single_pass=False,  # dt_proj.weight is read directly by the mixer, never called
    final_norm="backbone.norm_f",
    embed="backbone.embeddings",
    mlp_width_key=None,
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma": LLAMA,
    "gemma2": LLAMA,
    "gemma3_text": LLAMA,
    "olmo": LLAMA,
    "olmo2": LLAMA,
    "granite": LLAMA,
    "phi3": PHI3,
    "phi": PHI,
    "gpt2": GPT2,
    "opt": OPT,
    "mixtral": MIXTRAL,
    "mamba": MAMBA,
}


@dataclass(frozen=True)
class GGUFSpec:
    """How llama.cpp names this architecture in a GGUF file.

    ``arch`` is the ``general.architecture`` value (a ``gguf.MODEL_ARCH`` name, lower case).
    ``rope_interleaved``: llama.cpp rotates interleaved pairs of q/k dimensions where transformers
    rotates the two halves of each head, so the rows of q_proj / k_proj are reordered per head.
    """

    arch: str
    rope_interleaved: bool = False
    # the llama.cpp architecture that builds each block with its own feed_forward_length (its
    # ``llama`` sizes every block's MLP by block 0's; ``deci``, the Llama variant of DeciLM /
    # Nemotron-NAS, reads the per-layer array); None: per-block widths cannot be exported
    varying_widths_arch: str | None = None


GGUF_ARCHITECTURES: dict[str, GGUFSpec] = {
    "llama": GGUFSpec("llama", rope_interleaved=True, varying_widths_arch="deci"),
    "mistral": GGUFSpec("llama", rope_interleaved=True, varying_widths_arch="deci"),
    "qwen2": GGUFSpec("qwen2"),
}


def register_architecture(model_type: str, spec: ArchSpec) -> None:
    """Add (or override) the adapter for ``model_type``."""
    ARCHITECTURES[model_type] = spec


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)
