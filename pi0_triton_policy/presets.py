"""Policy presets: one TOML file per preset in `configs/` (OpenPI's pi0 train configs, serving side only).

A preset names the robot transform, action horizon, output dims, delta-action mask, default prompt,
norm-stats asset id, norm kind and the metadata the server sends after the handshake. The files ship
inside the package as `pi0_triton_policy.configs` (pyproject maps the top-level `configs/` there), and a
source checkout falls back to reading `configs/` beside the package, so both kinds of install find them.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import os
import pathlib
import tomllib

from pi0_triton_policy.normalize import NORM_KINDS
from pi0_triton_policy.transforms import ROBOT_TRANSFORMS, RobotTransform, make_bool_mask, make_robot_transform

# serve_policy's --env choices (OpenPI's EnvMode) -> our preset.
ENV_TO_PRESET = {"ALOHA": "pi0_aloha", "ALOHA_SIM": "pi0_aloha_sim", "DROID": "pi0_droid", "LIBERO": "pi0_libero"}

_REQUIRED = ("robot", "action_horizon", "action_dim", "asset_id", "norm")


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    robot: str  # "aloha" | "droid" | "libero"
    action_horizon: int  # actions returned per call (the model's horizon in OpenPI's config)
    action_dim: int  # robot action dims returned
    asset_id: str  # norm stats live at <weights>/assets/<asset_id>/norm_stats.json
    norm: str = "zscore"  # "zscore" (pi0) or "quantile" (pi0.5 / FAST)
    delta_action_dims: tuple[int, ...] = ()  # make_bool_mask dims; () = absolute actions
    default_prompt: str | None = None
    adapt_to_pi: bool = True  # ALOHA only: ALOHA runtime space <-> pi0's space
    model_variant: str = "pi0"
    max_token_len: int = 48
    metadata: dict = dataclasses.field(default_factory=dict)
    description: str = ""
    openpi_checkpoint: str | None = None
    source: str = ""  # the file it was read from

    def __post_init__(self):
        if self.robot not in ROBOT_TRANSFORMS:
            raise ValueError(f"preset {self.name!r}: unknown robot {self.robot!r}; expected one of {', '.join(ROBOT_TRANSFORMS)}")
        if self.norm not in NORM_KINDS:
            raise ValueError(f"preset {self.name!r}: unknown norm {self.norm!r}; expected one of {NORM_KINDS}")
        for field in ("action_horizon", "action_dim", "max_token_len"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                raise ValueError(f"preset {self.name!r}: {field} must be a positive integer, got {getattr(self, field)!r}")
        if len(self.delta_action_mask or ()) > self.action_dim:
            raise ValueError(f"preset {self.name!r}: delta_action_dims cover more than action_dim={self.action_dim} dims")

    @property
    def delta_action_mask(self) -> tuple[bool, ...] | None:
        return make_bool_mask(*self.delta_action_dims) if self.delta_action_dims else None

    def robot_transform(self) -> RobotTransform:
        kwargs = {"adapt_to_pi": self.adapt_to_pi} if self.robot == "aloha" else {}
        return make_robot_transform(self.robot, **kwargs)


def configs_dir() -> pathlib.Path:
    """Where the preset files are: the packaged `pi0_triton_policy.configs`, else the checkout's `configs/`."""
    try:
        packaged = importlib.resources.files("pi0_triton_policy.configs")
        if any(str(p.name).endswith(".toml") for p in packaged.iterdir()):
            return pathlib.Path(str(packaged))
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        pass
    return pathlib.Path(__file__).resolve().parent.parent / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.toml"))


def load_preset_file(path: str | os.PathLike) -> Preset:
    p = pathlib.Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"preset file {str(p)!r} is not valid TOML: {e}") from e
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ValueError(f"preset file {str(p)!r} lacks required keys {missing}")
    known = {f.name for f in dataclasses.fields(Preset)} - {"name", "source"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"preset file {str(p)!r} has unknown keys {unknown}; known keys: {sorted(known)}")
    data["delta_action_dims"] = tuple(data.get("delta_action_dims", ()))
    return Preset(name=p.stem, source=str(p), **data)


def get_preset(name: str) -> Preset:
    """The named preset (a name in configs/, or a path to a .toml file); an unknown name suggests close ones."""
    if name.endswith(".toml") and pathlib.Path(name).is_file():
        return load_preset_file(name)
    path = configs_dir() / f"{name}.toml"
    if path.is_file():
        return load_preset_file(path)
    known = preset_names()
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise KeyError(f"unknown preset {name!r}.{hint} Known: {', '.join(known)} (files in {configs_dir()})")
