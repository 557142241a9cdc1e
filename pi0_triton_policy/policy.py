"""The OpenPI policy over any backend: robot observation -> backend.sample_actions -> robot actions.

Pi0Policy.infer follows OpenPI's Policy for pi0 configs (OPENPI_SPEC.md sections 3-4):
  prompt (or the default) -> robot inputs -> normalize state -> resize-with-pad 224 -> tokenize -> pad to 32
  -> backend.sample_actions -> unnormalize -> absolute actions (delta presets) -> robot outputs.
State and actions are normalized/unnormalized in float64 (OpenPI's norm stats are float64, so its
actions come out float64); the backend sees float32, as the JAX model does.

Returns {"actions": float64 [H, d], "state": float64 [32], "policy_timing": {"infer_ms": model time}}.
"state" is the model-space state after unnormalizing (what OpenPI's output chain sees before the robot
transform); OpenPI's robot transforms then drop it, so an OpenPI server does not send it.
"""

from __future__ import annotations

import copy
import logging
import os
import pathlib
import time
from collections.abc import Mapping

import numpy as np
from openpi_client import base_policy

from pi0_triton_policy import normalize as N
from pi0_triton_policy.presets import ENV_TO_PRESET, Preset, get_preset  # noqa: F401 - re-exported
from pi0_triton_policy.tokenizer import load_tokenizer
from pi0_triton_policy.transforms import (
    IMAGE_SLOTS,
    MODEL_IMAGE_SIZE,
    ObservationError,
    image_to_model,
    parse_prompt,
    resize_many_with_pad,
    to_absolute_actions,
)

__all__ = ["ENV_TO_PRESET", "ObservationError", "Pi0Policy", "create_policy", "make_example_observation"]

log = logging.getLogger(__name__)

MODEL_STATE_DIM = 32  # OpenPI pads state and actions to the model's action_dim


class Pi0Policy(base_policy.BasePolicy):
    """An OpenPI BasePolicy over a backend (`triton`, `torch` or `jax`; see backends.py)."""

    def __init__(
        self,
        backend,
        preset: str | Preset,
        norm_stats: dict[str, N.NormStats] | None = None,
        tokenizer=None,
        default_prompt: str | None = None,
        seed: int = 0,
        record_dir: str | os.PathLike | None = None,
        num_steps: int = 10,
    ):
        self.backend = backend
        self.preset = preset if isinstance(preset, Preset) else get_preset(preset)
        self.robot = self.preset.robot_transform()
        self.num_steps = num_steps
        self.default_prompt = default_prompt if default_prompt is not None else self.preset.default_prompt
        cfg = backend.cfg
        self.model_horizon = cfg.action_horizon
        self.model_action_dim = cfg.action_dim
        if self.model_horizon < self.preset.action_horizon:
            raise ValueError(
                f"preset {self.preset.name!r} returns {self.preset.action_horizon} actions but the model makes only {self.model_horizon}"
            )
        if self.model_horizon != self.preset.action_horizon:
            # Action tokens attend to each other, so a 50-token model sliced to 10 is not OpenPI's 10-token model.
            log.warning(
                "preset %r has action_horizon=%d but the backend's model has %d: returning the first %d actions, "
                "which will not match OpenPI exactly; build the model with action_horizon=%d for that",
                self.preset.name, self.preset.action_horizon, self.model_horizon,
                self.preset.action_horizon, self.preset.action_horizon,
            )
        if cfg.max_token_len != self.preset.max_token_len:
            raise ValueError(f"preset max_token_len {self.preset.max_token_len} != model max_token_len {cfg.max_token_len}")

        if norm_stats is None:
            log.warning(
                "no norm stats given for preset %r: using identity stats (mean 0, std 1): fine for random weights, "
                "wrong for a trained checkpoint", self.preset.name,
            )
            norm_stats = N.identity_norm_stats(MODEL_STATE_DIM, MODEL_STATE_DIM)
        for key in ("state", "actions"):
            if key not in norm_stats:
                raise ValueError(f"norm stats lack {key!r} (they have {sorted(norm_stats)})")
        if norm_stats["state"].dim < self.robot.state_dim:
            raise ValueError(f"norm stats for state have {norm_stats['state'].dim} dims; robot {self.robot.name} sends {self.robot.state_dim}")
        self.norm_stats = norm_stats

        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(max_len=self.preset.max_token_len)
        if getattr(self.tokenizer, "max_len", self.preset.max_token_len) != self.preset.max_token_len:
            raise ValueError(f"tokenizer max_len {self.tokenizer.max_len} != preset max_token_len {self.preset.max_token_len}")

        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self.record_dir = pathlib.Path(record_dir) if record_dir is not None else None
        self._record_step = 0
        if self.record_dir is not None:
            self.record_dir.mkdir(parents=True, exist_ok=True)
            log.info("recording policy steps to %s", self.record_dir)

    # -- BasePolicy -------------------------------------------------------------------------------

    @property
    def metadata(self) -> dict:
        """Sent to each client after the handshake (ALOHA presets: reset_pose)."""
        return copy.deepcopy(self.preset.metadata)

    def reset(self) -> None:
        """Nothing to reset: pi0 is stateless between calls. As in OpenPI, the noise stream keeps going."""

    def infer(self, obs: dict, noise: np.ndarray | None = None) -> dict:
        if not isinstance(obs, Mapping):
            raise ObservationError(f"observation: expected a dict, got {type(obs).__name__}")
        inputs = self.prepare_inputs(obs)
        noise = self._noise(noise)

        start = time.monotonic()
        raw = self.backend.sample_actions(
            inputs["images"], inputs["image_mask"], inputs["tokens"], inputs["token_mask"], inputs["state"], noise,
            num_steps=self.num_steps,
        )
        infer_ms = (time.monotonic() - start) * 1000.0

        outputs = self.finish_outputs(np.asarray(raw), inputs["state"])
        outputs["policy_timing"] = {"infer_ms": infer_ms}
        if self.record_dir is not None:
            from pi0_triton_policy.records import write_record

            write_record(self.record_dir, self._record_step, obs, outputs)
            self._record_step += 1
        return outputs

    # -- the two halves, public so A/B scripts can inspect what a backend is given ---------------

    def prepare_inputs(self, obs: Mapping) -> dict[str, np.ndarray]:
        """Observation -> the backend's arrays (see backends.py for shapes and dtypes)."""
        prompt = obs.get("prompt", None)
        if prompt is None:
            prompt = self.default_prompt
        if prompt is None:
            raise ObservationError(
                f"observation is missing key 'prompt': expected a str, and preset {self.preset.name!r} has no default "
                f"prompt; got keys {sorted(map(str, obs))}"
            )
        prompt = parse_prompt(prompt)
        robot_in = self.robot.inputs(obs)

        state = N.normalize(robot_in.state, self.norm_stats["state"], self.preset.norm)
        state = N.pad_to_dim(state, self.model_action_dim).astype(np.float32)  # padded AFTER normalizing

        size = MODEL_IMAGE_SIZE
        images = np.empty((len(IMAGE_SLOTS), size, size, 3), dtype=np.float32)
        image_mask = np.array([bool(robot_in.image_mask[slot]) for slot in IMAGE_SLOTS])
        present = [slot for slot in IMAGE_SLOTS if robot_in.image_mask[slot]]
        resized = dict(zip(present, resize_many_with_pad([robot_in.images[slot] for slot in present], size, size)))
        for i, slot in enumerate(IMAGE_SLOTS):
            if image_mask[i]:
                images[i] = image_to_model(resized[slot])
            else:  # an absent camera is all zeros at any size, so resizing it changes nothing: pixels 0 -> -1
                images[i] = -1.0

        tokens, token_mask = self.tokenizer.tokenize(prompt)
        return {
            "images": images,  # [3, 224, 224, 3] float32 in [-1, 1]
            "image_mask": image_mask,  # [3]
            "tokens": tokens.astype(np.int32),  # [48]
            "token_mask": token_mask.astype(bool),  # [48]
            "state": state,  # [32] float32, normalized
        }

    def finish_outputs(self, raw_actions: np.ndarray, model_state: np.ndarray) -> dict[str, np.ndarray]:
        """Backend actions [H_model, 32] (normalized) -> {"actions": [H, d] float64, "state": [32] float64}."""
        kind = self.preset.norm
        state = N.unnormalize(model_state, self.norm_stats["state"], kind)
        actions = N.unnormalize(raw_actions, self.norm_stats["actions"], kind)
        actions = to_absolute_actions(actions, state, self.preset.delta_action_mask)
        actions = self.robot.outputs(actions[: self.preset.action_horizon])
        return {"actions": np.asarray(actions, dtype=np.float64), "state": np.asarray(state, dtype=np.float64)}

    def _noise(self, noise) -> np.ndarray:
        shape = (self.model_horizon, self.model_action_dim)
        if noise is None:
            return self._rng.standard_normal(shape, dtype=np.float32)
        noise = np.asarray(noise)
        if noise.shape != shape or noise.dtype.kind != "f":
            raise ValueError(f"noise: expected a float array of shape {shape}, got shape {noise.shape} and dtype {noise.dtype}")
        return noise.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Factory and example observations
# ---------------------------------------------------------------------------------------------


def norm_stats_path(weights_dir: str | os.PathLike, preset: Preset) -> pathlib.Path:
    return pathlib.Path(weights_dir) / "assets" / preset.asset_id / N.NORM_STATS_FILE


def create_policy(
    preset_name: str,
    backend,
    weights_dir: str | os.PathLike | None = None,
    default_prompt: str | None = None,
    record_dir: str | os.PathLike | None = None,
    seed: int = 0,
    num_steps: int = 10,
) -> Pi0Policy:
    """A Pi0Policy for a preset, with norm stats and tokenizer found next to the weights.

    weights_dir given: norm stats from `<weights_dir>/assets/<asset_id>/norm_stats.json` and the tokenizer
    from the usual lookup (weights dir, then OpenPI's cache); both missing files are errors.
    weights_dir None (random weights): identity norm stats and, if no tokenizer file exists anywhere, the
    fallback tokenizer; both are logged as warnings.
    """
    preset = get_preset(preset_name)
    if weights_dir is not None:
        path = norm_stats_path(weights_dir, preset)
        if not path.is_file():
            assets = pathlib.Path(weights_dir) / "assets"
            have = sorted(str(p.parent.relative_to(assets)) for p in assets.rglob(N.NORM_STATS_FILE)) if assets.is_dir() else []
            raise FileNotFoundError(
                f"norm stats for preset {preset.name!r} not found at {str(path)!r} (asset id {preset.asset_id!r}). "
                f"This weights directory has norm stats for: {have or 'nothing'}. Re-convert from the OpenPI checkpoint "
                f"that has assets/{preset.asset_id}/norm_stats.json, or pick the preset matching this checkpoint."
            )
        norm_stats = N.load_norm_stats(path)
        tokenizer = load_tokenizer(weights_dir=weights_dir, max_len=preset.max_token_len)
    else:
        log.warning(
            "no weights directory: using identity norm stats (mean 0, std 1) for preset %r; fine for random weights only",
            preset.name,
        )
        norm_stats = N.identity_norm_stats(MODEL_STATE_DIM, MODEL_STATE_DIM)
        tokenizer = load_tokenizer(allow_fallback=True, max_len=preset.max_token_len)
    return Pi0Policy(
        backend, preset, norm_stats=norm_stats, tokenizer=tokenizer, default_prompt=default_prompt,
        seed=seed, record_dir=record_dir, num_steps=num_steps,
    )


_EXAMPLE_PROMPTS = {"aloha": "fold the towel", "droid": "pick up the marker", "libero": "put the bowl on the plate"}


def make_example_observation(preset_name: str, rng: np.random.Generator | int | None = None, float_images: bool = False) -> dict:
    """An observation shaped like OpenPI's example clients for the preset's robot.

    ALOHA: CHW uint8 3x480x640 frames (cam_high, cam_low, cam_left_wrist, cam_right_wrist; the sim preset
    sends cam_high only, as gym-aloha does) + state [14]. DROID: HWC 180x320 exterior + wrist frames,
    joint_position [7], gripper_position [1]. LIBERO: HWC 224x224 image + wrist image, state [8].
    `float_images` gives float32 frames in [0, 1] instead (LeRobot-style).
    """
    preset = get_preset(preset_name)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

    def frame(*shape):
        img = rng.integers(0, 256, size=shape, dtype=np.uint8)
        return (img.astype(np.float32) / 255.0) if float_images else img

    prompt = preset.default_prompt or _EXAMPLE_PROMPTS[preset.robot]
    if preset.robot == "aloha":
        cams = ("cam_high",) if preset.name == "pi0_aloha_sim" else ("cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist")
        state = rng.uniform(-0.5, 0.5, size=14)
        state[[6, 13]] = rng.uniform(0.2, 0.8, size=2)  # grippers: normalized linear position
        return {"state": state, "images": {c: frame(3, 480, 640) for c in cams}, "prompt": prompt}
    if preset.robot == "droid":
        return {
            "observation/exterior_image_1_left": frame(180, 320, 3),
            "observation/wrist_image_left": frame(180, 320, 3),
            "observation/joint_position": rng.uniform(-1.0, 1.0, size=7),
            "observation/gripper_position": rng.uniform(0.0, 1.0, size=1),
            "prompt": prompt,
        }
    if preset.robot == "libero":
        return {
            "observation/image": frame(224, 224, 3),
            "observation/wrist_image": frame(224, 224, 3),
            "observation/state": rng.uniform(-1.0, 1.0, size=8),
            "prompt": prompt,
        }
    raise KeyError(f"no example observation for robot {preset.robot!r}")
