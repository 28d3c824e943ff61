"""Model configuration: one dataclass per model part, named presets, and a loader
from the reference implementation's JSON names (the `lm` and `mimi` sections of a
`config.json`, the constructor arguments of the reference's `LMModel` and Mimi parts).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

# Tokens of the prompt phase (docs/SPEC.md): what the agent and the user "say" in silence.
SILENCE_TOKENS = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)
SINE_TOKENS = (430, 1268, 381, 1611, 1095, 1495, 56, 472)
# Special text ids: padding (PAD, the text of every voice and silence frame of the prompt, and
# of frames where the agent says nothing) and the end of a run of padding (EPAD).
TEXT_PAD = 3
TEXT_EPAD = 0
DEFAULT_TEXT_PROMPT = (
    "You are a wise and friendly teacher. Answer questions or provide advice in a clear and engaging way."
)


from .errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration the engine cannot run; the message says which field."""


def _gated_hidden(dim: int, dim_feedforward: int) -> int:
    # The reference's ActivationGating sizes its hidden layer this way.
    if dim_feedforward == 4 * dim:
        return (21 * dim) // 8
    return (2 * dim_feedforward) // 3


@dataclass(frozen=True)
class TemporalConfig:
    """The temporal transformer: one position per 80 ms frame."""
    dim: int = 4096
    num_heads: int = 32
    num_layers: int = 32
    hidden: int = 11264          # gated FFN: linear_in is dim -> 2 * hidden
    context: int = 3000          # a query at p sees keys p - context + 1 .. p
    max_period: float = 10_000.0  # RoPE
    norm_eps: float = 1e-8
    full_window: bool = False    # Moshi: a query sees all `context` keys (see `window`)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def window(self) -> int:
        """Keys a query sees: PersonaPlex's ring cache of `context` entries never shows its
        oldest entry, so a query at p sees p - context + 2 .. p (pinned by the golden traces);
        Kyutai's Moshi shows all `context` (pinned by its trace)."""
        return self.context if self.full_window else self.context - 1


@dataclass(frozen=True)
class DepformerConfig:
    """The depth transformer: one position per codebook of the current frame."""
    dim: int = 1024
    num_heads: int = 16
    num_layers: int = 6
    hidden: int = 2816
    steps: int = 16              # weights per step; steps 8.. predict the user's codebooks
    norm_eps: float = 1e-8

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass(frozen=True)
class LMConfig:
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    depformer: DepformerConfig = field(default_factory=DepformerConfig)
    text_card: int = 32000
    card: int = 2048
    n_q: int = 16                # audio streams: 8 agent codebooks then 8 user codebooks
    delays: tuple[int, ...] = (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)
    text_padding_id: int = TEXT_PAD

    @property
    def num_streams(self) -> int:
        return self.n_q + 1

    @property
    def agent_codebooks(self) -> int:
        return self.n_q // 2

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def ring_size(self) -> int:
        # The reference's token cache holds max_delay + 3 columns.
        return self.max_delay + 3

    @property
    def text_initial_id(self) -> int:
        return self.text_card

    @property
    def audio_initial_id(self) -> int:
        return self.card


@dataclass(frozen=True)
class SeanetConfig:
    channels: int = 1
    dimension: int = 512
    n_filters: int = 64
    n_residual_layers: int = 1
    ratios: tuple[int, ...] = (8, 6, 5, 4)   # decoder order; the encoder runs them reversed
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2

    @property
    def hop_length(self) -> int:
        n = 1
        for r in self.ratios:
            n *= r
        return n


@dataclass(frozen=True)
class MimiTransformerConfig:
    dim: int = 512
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    context: int = 250
    max_period: float = 10_000.0
    norm_eps: float = 1e-5
    full_window: bool = False    # Moshi's Mimi: all `context` keys (see TemporalConfig.window)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def window(self) -> int:
        """Ring entries: the newest context - 1 keys, or context with `full_window` (see
        TemporalConfig.window)."""
        return self.context if self.full_window else self.context - 1


@dataclass(frozen=True)
class QuantizerConfig:
    dimension: int = 256
    n_q: int = 32
    bins: int = 2048
    input_dimension: int = 512
    output_dimension: int = 512
    n_q_semantic: int = 1


@dataclass(frozen=True)
class MimiConfig:
    seanet: SeanetConfig = field(default_factory=SeanetConfig)
    transformer: MimiTransformerConfig = field(default_factory=MimiTransformerConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    num_codebooks: int = 8
    sample_rate: int = 24000
    frame_rate: float = 12.5

    @property
    def frame_size(self) -> int:
        return int(self.sample_rate / self.frame_rate)

    @property
    def encoder_frame_rate(self) -> float:
        return self.sample_rate / self.seanet.hop_length

    @property
    def downsample_stride(self) -> int:
        return int(self.encoder_frame_rate / self.frame_rate)


FAMILIES = ("personaplex", "moshi")


@dataclass(frozen=True)
class ModelConfig:
    """A model: its LM, its Mimi, and its family. "personaplex": a voice prompt and a role
    prompt before the conversation (the prompt phase). "moshi": Kyutai's Moshi checkpoints, no
    prompt: a conversation starts cold from the model's initial tokens (`moshi_config`)."""
    name: str
    lm: LMConfig
    mimi: MimiConfig
    family: str = "personaplex"

    @property
    def moshi(self) -> bool:
        return self.family == "moshi"

    def to_reference_json(self) -> dict[str, Any]:
        return {"lm": lm_config_to_reference(self.lm), "mimi": mimi_config_to_reference(self.mimi),
                "model": self.family}


def moshi_config(cfg: ModelConfig, name: str | None = None) -> ModelConfig:
    """`cfg` run as Kyutai's Moshi: the family, and attention windows of the full context in the
    LM and in Mimi."""
    lm = replace(cfg.lm, temporal=replace(cfg.lm.temporal, full_window=True))
    mimi = replace(cfg.mimi, transformer=replace(cfg.mimi.transformer, full_window=True))
    return ModelConfig(name=name or cfg.name, lm=lm, mimi=mimi, family="moshi")


# ----------------------------------------------------------------------------------------
# Reference JSON names <-> dataclasses

_LM_SUPPORTED = {
    "causal": True,
    "gating": "silu",
    "depformer_gating": "silu",
    "positional_embedding": "rope",
    "depformer_pos_emb": "none",
    "depformer_multi_linear": True,
    "depformer_weights_per_step": True,
    "depformer_causal": True,
}
_NORM_EPS = {"rms_norm_f32": 1e-8}


def _require(d: dict, key: str, where: str):
    if key not in d:
        raise ConfigError(f"{where}: missing field '{key}'")
    return d[key]


def lm_config_from_reference(d: dict[str, Any]) -> LMConfig:
    """Build an LMConfig from the reference's `LMModel` constructor arguments."""
    where = "lm config"
    for key, want in _LM_SUPPORTED.items():
        if key in d and d[key] != want:
            raise ConfigError(f"{where}: '{key}' = {d[key]!r} is not supported (the engine runs {want!r})")
    for key in ("layer_scale", "depformer_layer_scale"):
        if d.get(key) is not None:
            raise ConfigError(f"{where}: '{key}' = {d[key]!r} is not supported (the engine runs none)")
    norm = d.get("norm", "rms_norm_f32")
    if norm not in _NORM_EPS:
        raise ConfigError(f"{where}: 'norm' = {norm!r} is not supported (the engine runs 'rms_norm_f32')")
    pad = d.get("existing_text_padding_id")
    if pad is None:
        raise ConfigError(f"{where}: 'existing_text_padding_id' must be set (PersonaPlex uses 3)")
    dim = int(_require(d, "dim", where))
    hidden_scale = float(d.get("hidden_scale", 4))
    dep_dim = int(_require(d, "depformer_dim", where))
    dep_ff = d.get("depformer_dim_feedforward")
    if dep_ff is None:
        dep_ff = int(hidden_scale * dep_dim)
    if isinstance(dep_ff, list):
        raise ConfigError(f"{where}: a per-step 'depformer_dim_feedforward' list is not supported")
    n_q = int(_require(d, "n_q", where))
    dep_q = int(_require(d, "dep_q", where))
    delays = tuple(int(x) for x in _require(d, "delays", where))
    if len(delays) != n_q + 1:
        raise ConfigError(f"{where}: {len(delays)} delays for {n_q + 1} streams")
    if n_q % 2:
        raise ConfigError(f"{where}: n_q = {n_q} must hold as many user as agent codebooks")
    if dep_q < n_q // 2:
        raise ConfigError(f"{where}: dep_q = {dep_q} is fewer than the {n_q // 2} agent codebooks")
    temporal = TemporalConfig(
        dim=dim,
        num_heads=int(_require(d, "num_heads", where)),
        num_layers=int(_require(d, "num_layers", where)),
        hidden=_gated_hidden(dim, int(hidden_scale * dim)),
        context=int(_require(d, "context", where)),
        max_period=float(d.get("max_period", 10_000)),
        norm_eps=_NORM_EPS[norm],
    )
    depformer = DepformerConfig(
        dim=dep_dim,
        num_heads=int(d.get("depformer_num_heads", d.get("num_heads"))),
        num_layers=int(_require(d, "depformer_num_layers", where)),
        hidden=_gated_hidden(dep_dim, int(dep_ff)),
        steps=dep_q,
        norm_eps=_NORM_EPS[norm],
    )
    return LMConfig(
        temporal=temporal,
        depformer=depformer,
        text_card=int(_require(d, "text_card", where)),
        card=int(_require(d, "card", where)),
        n_q=n_q,
        delays=delays,
        text_padding_id=int(pad),
    )


def _hidden_to_dim_ff(dim: int, hidden: int) -> int:
    if hidden == (21 * dim) // 8:
        return 4 * dim
    return (3 * hidden) // 2


def lm_config_to_reference(c: LMConfig) -> dict[str, Any]:
    t, dep = c.temporal, c.depformer
    dim_ff = _hidden_to_dim_ff(t.dim, t.hidden)
    return {
        "dim": t.dim, "text_card": c.text_card, "existing_text_padding_id": c.text_padding_id,
        "n_q": c.n_q, "dep_q": dep.steps, "card": c.card, "num_heads": t.num_heads,
        "num_layers": t.num_layers, "hidden_scale": dim_ff / t.dim, "causal": True,
        "layer_scale": None, "context": t.context, "max_period": t.max_period, "gating": "silu",
        "norm": "rms_norm_f32", "positional_embedding": "rope", "depformer_dim": dep.dim,
        "depformer_dim_feedforward": _hidden_to_dim_ff(dep.dim, dep.hidden),
        "depformer_num_heads": dep.num_heads, "depformer_num_layers": dep.num_layers,
        "depformer_causal": True, "depformer_layer_scale": None, "depformer_multi_linear": True,
        "depformer_context": 8, "depformer_max_period": 10000, "depformer_gating": "silu",
        "depformer_pos_emb": "none", "depformer_weights_per_step": True, "delays": list(c.delays),
    }


def mimi_config_from_reference(d: dict[str, Any]) -> MimiConfig:
    where = "mimi config"
    s = _require(d, "seanet", where)
    t = _require(d, "transformer", where)
    q = _require(d, "quantizer", where)
    checks = [
        (s, "causal", True), (s, "norm", "none"), (s, "activation", "ELU"), (s, "true_skip", True),
        (s, "pad_mode", "constant"), (t, "causal", True), (t, "gating", "none"),
        (t, "norm", "layer_norm"), (t, "positional_embedding", "rope"),
    ]
    for section, key, want in checks:
        if key in section and section[key] != want:
            raise ConfigError(f"{where}: '{key}' = {section[key]!r} is not supported (the engine runs {want!r})")
    if int(s.get("dimension", 512)) != int(t["d_model"]):
        raise ConfigError(f"{where}: transformer d_model must equal the SEANet dimension")
    seanet = SeanetConfig(
        channels=int(s.get("channels", 1)), dimension=int(s["dimension"]), n_filters=int(s["n_filters"]),
        n_residual_layers=int(s.get("n_residual_layers", 1)), ratios=tuple(int(r) for r in s["ratios"]),
        kernel_size=int(s.get("kernel_size", 7)), last_kernel_size=int(s.get("last_kernel_size", 7)),
        residual_kernel_size=int(s.get("residual_kernel_size", 3)),
        dilation_base=int(s.get("dilation_base", 2)), compress=int(s.get("compress", 2)),
    )
    transformer = MimiTransformerConfig(
        dim=int(t["d_model"]), num_heads=int(t["num_heads"]), num_layers=int(t["num_layers"]),
        dim_feedforward=int(t["dim_feedforward"]), context=int(t["context"]),
        max_period=float(t.get("max_period", 10_000)),
    )
    quantizer = QuantizerConfig(
        dimension=int(q["dimension"]), n_q=int(q["n_q"]), bins=int(q["bins"]),
        input_dimension=int(q.get("input_dimension", seanet.dimension)),
        output_dimension=int(q.get("output_dimension", seanet.dimension)),
    )
    cfg = MimiConfig(
        seanet=seanet, transformer=transformer, quantizer=quantizer,
        num_codebooks=int(d.get("num_codebooks", 8)), sample_rate=int(d.get("sample_rate", 24000)),
        frame_rate=float(d.get("frame_rate", 12.5)),
    )
    if cfg.frame_size % seanet.hop_length or cfg.downsample_stride * seanet.hop_length != cfg.frame_size:
        raise ConfigError(f"{where}: a frame of {cfg.frame_size} samples must be a whole number of hops")
    return cfg


def mimi_config_to_reference(c: MimiConfig) -> dict[str, Any]:
    s, t, q = c.seanet, c.transformer, c.quantizer
    return {
        "seanet": {
            "channels": s.channels, "dimension": s.dimension, "causal": True, "n_filters": s.n_filters,
            "n_residual_layers": s.n_residual_layers, "activation": "ELU", "compress": s.compress,
            "dilation_base": s.dilation_base, "disable_norm_outer_blocks": 0, "kernel_size": s.kernel_size,
            "residual_kernel_size": s.residual_kernel_size, "last_kernel_size": s.last_kernel_size,
            "norm": "none", "pad_mode": "constant", "ratios": list(s.ratios), "true_skip": True,
        },
        "quantizer": {
            "dimension": q.dimension, "n_q": q.n_q, "bins": q.bins,
            "input_dimension": q.input_dimension, "output_dimension": q.output_dimension,
        },
        "transformer": {
            "d_model": t.dim, "num_heads": t.num_heads, "num_layers": t.num_layers, "causal": True,
            "layer_scale": 0.01, "context": t.context, "conv_layout": True, "max_period": t.max_period,
            "gating": "none", "norm": "layer_norm", "positional_embedding": "rope",
            "dim_feedforward": t.dim_feedforward, "input_dimension": t.dim, "output_dimensions": [t.dim],
        },
        "num_codebooks": c.num_codebooks, "sample_rate": c.sample_rate, "frame_rate": c.frame_rate,
    }


# ----------------------------------------------------------------------------------------
# Presets

PERSONAPLEX_7B = ModelConfig(name="personaplex-7b-v1", lm=LMConfig(), mimi=MimiConfig())

TINY = ModelConfig(
    name="tiny",
    lm=LMConfig(
        temporal=TemporalConfig(dim=64, num_heads=4, num_layers=2, hidden=176, context=20),
        depformer=DepformerConfig(dim=32, num_heads=2, num_layers=2, hidden=88, steps=16),
        text_card=256,
    ),
    mimi=MimiConfig(
        seanet=SeanetConfig(dimension=32, n_filters=4),
        transformer=MimiTransformerConfig(dim=32, num_heads=2, num_layers=2, dim_feedforward=64, context=16),
        quantizer=QuantizerConfig(dimension=16, input_dimension=32, output_dimension=32),
    ),
)

# Kyutai's moshiko / moshika (and their RL post-trained versions): PersonaPlex's shapes with a
# depformer of 8 steps
MOSHI_7B = moshi_config(ModelConfig(name="moshi-7b", lm=replace(LMConfig(), depformer=DepformerConfig(steps=8)),
                                    mimi=MimiConfig()))
MOSHI_REPOS = ("kyutai/moshiko-pytorch-bf16", "kyutai/moshika-pytorch-bf16", "kyutai/moshika-rl-seamless")

PRESETS: dict[str, ModelConfig] = {c.name: c for c in (PERSONAPLEX_7B, MOSHI_7B, TINY)}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}'; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def load_config(path: str | Path, name: str | None = None) -> ModelConfig:
    """Read a JSON file with the reference's names: either `{"lm": ..., "mimi": ...}` or
    only the LM's arguments at the top level (Mimi then takes the 7B values)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file '{path}' is not readable JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file '{path}' must hold a JSON object")
    if "lm" in d:
        lm = lm_config_from_reference(d["lm"])
        mimi = mimi_config_from_reference(d["mimi"]) if "mimi" in d else MimiConfig()
    elif "dim" in d:
        lm, mimi = lm_config_from_reference(d), MimiConfig()
    else:
        raise ConfigError(f"config file '{path}' has neither an 'lm' section nor LM fields")
    cfg = ModelConfig(name=name or path.stem, lm=lm, mimi=mimi)
    family = d.get("model", d.get("family"))
    if family is not None and family not in FAMILIES:
        raise ConfigError(f"config file '{path}': 'model' = {family!r} is not one the engine runs "
                          f"({', '.join(FAMILIES)})")
    if family is None:
        # (Kyutai's own configs say "model_type": "moshi" for every model of the architecture,
        # PersonaPlex's too: the depformer tells them apart)
        family = "moshi" if lm.depformer.steps == lm.agent_codebooks else "personaplex"
    return moshi_config(cfg) if family == "moshi" else cfg


__all__ = [
    "ConfigError", "TemporalConfig", "DepformerConfig", "LMConfig", "SeanetConfig",
    "MimiTransformerConfig", "QuantizerConfig", "MimiConfig", "ModelConfig", "PRESETS",
    "PERSONAPLEX_7B", "MOSHI_7B", "MOSHI_REPOS", "FAMILIES", "moshi_config", "TINY", "get_preset", "load_config", "lm_config_from_reference",
    "mimi_config_from_reference", "SILENCE_TOKENS", "SINE_TOKENS", "TEXT_PAD", "TEXT_EPAD",
    "DEFAULT_TEXT_PROMPT", "asdict", "replace",
]
