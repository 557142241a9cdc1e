"""Robot transforms: an OpenPI robot's observation -> the model's slots, and model actions -> robot actions.

Behaviour follows OpenPI's pi0 configs (OPENPI_SPEC.md section 4; openpi `transforms.py`,
`policies/{aloha,droid,libero}_policy.py`, `openpi_client/image_tools.py`), re-implemented here:

  images   float input is taken as [0, 1] -> uint8 `255 * x` (truncating, as OpenPI does); CHW -> HWC;
           PIL bilinear resize-with-pad to 224x224; model pixels `x / 255 * 2 - 1`.
  slots    base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb; an absent camera is zeros with mask False.
  ALOHA    sign flips and gripper maps between the ALOHA runtime's space and pi0's ("adapt_to_pi").
  delta    absolute = delta + state on the masked dims (applied after unnormalizing, before the robot map).

Observations are validated on the way in: anything malformed raises `ObservationError` naming the key,
what was expected and what came, instead of failing deep inside numpy or PIL.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

MODEL_IMAGE_SIZE = 224  # SigLIP's input; OpenPI's ResizeImages(224, 224)
MAX_IMAGE_SIDE = 4096  # larger sides are refused: a bigger frame is a client bug, not a camera
IMAGE_SLOTS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


class ObservationError(ValueError):
    """An observation the policy cannot use; the message names the key, what was expected and what came."""


def _describe(value) -> str:
    """A short description of a received value, for error messages (never the whole payload)."""
    if isinstance(value, np.ndarray):
        return f"array of shape {value.shape} and dtype {value.dtype}"
    if isinstance(value, (str, bytes)):
        text = value if len(value) <= 40 else value[:40] + (b"..." if isinstance(value, bytes) else "...")
        return f"{type(value).__name__} {text!r}"
    if isinstance(value, Mapping):
        return f"dict with keys {sorted(map(str, value))}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of length {len(value)}"
    return f"{type(value).__name__} {value!r}"[:80]


def require(obs: Mapping, key: str, expected: str, prefix: str = ""):
    """obs[key], or an ObservationError that says the key is missing and what was expected there."""
    if key not in obs:
        raise ObservationError(
            f"observation is missing key {prefix + key!r}: expected {expected}; got keys {sorted(map(str, obs))}"
        )
    return obs[key]


# ---------------------------------------------------------------------------------------------
# Vectors (state, joint positions)
# ---------------------------------------------------------------------------------------------


def parse_vector(value, key: str, size: int, allow_scalar: bool = False) -> np.ndarray:
    """A finite real vector of `size` entries as float64 (OpenPI's norm stats are float64, so all
    state arithmetic happens in float64 as it does there)."""
    expected = f"a finite float array of shape ({size},)"
    try:
        arr = np.asarray(value)
    except Exception as e:  # noqa: BLE001 - a ragged list, say
        raise ObservationError(f"{key!r}: expected {expected}, got {_describe(value)} ({e})") from e
    if arr.dtype.kind not in "fiu":
        raise ObservationError(f"{key!r}: expected {expected}, got {_describe(arr)}")
    if allow_scalar and arr.shape == ():
        arr = arr.reshape(1)
    if arr.shape != (size,):
        raise ObservationError(f"{key!r}: expected {expected}, got {_describe(arr)}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        bad = np.flatnonzero(~np.isfinite(arr)).tolist()
        raise ObservationError(f"{key!r}: expected {expected}, got non-finite values (NaN or inf) at indices {bad}")
    return arr


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def parse_image(value, key: str, layout: str = "auto") -> np.ndarray:
    """A camera frame -> uint8 HWC.

    layout "chw": the frame is [3, H, W] (ALOHA always sends CHW); "auto": `shape[0] == 3` means CHW,
    otherwise HWC (OpenPI's DROID/LIBERO rule). Float frames are taken as [0, 1] and become
    `uint8(255 * x)` exactly as OpenPI truncates them; values outside [0, 1] are clipped first (OpenPI
    would wrap them around, which is never what a client meant).
    """
    chw = "[3, H, W]" if layout == "chw" else "[H, W, 3] or [3, H, W]"
    expected = f"a {chw} image, uint8 or float in [0, 1], 1..{MAX_IMAGE_SIDE} px a side"
    try:
        img = np.asarray(value)
    except Exception as e:  # noqa: BLE001
        raise ObservationError(f"{key!r}: expected {expected}, got {_describe(value)} ({e})") from e
    if img.dtype != np.uint8 and img.dtype.kind != "f":
        raise ObservationError(f"{key!r}: expected {expected}, got {_describe(img)}")
    if img.ndim != 3:
        raise ObservationError(f"{key!r}: expected {expected}, got {_describe(img)}")
    if layout == "chw" or (layout == "auto" and img.shape[0] == 3):
        if img.shape[0] != 3:
            raise ObservationError(f"{key!r}: expected {expected}, got {_describe(img)}")
        img = np.transpose(img, (1, 2, 0))
    elif layout != "auto":
        raise ValueError(f"unknown image layout {layout!r}; expected 'chw' or 'auto'")
    h, w, c = img.shape
    if c != 3:
        raise ObservationError(f"{key!r}: expected {expected}, got {_describe(np.asarray(value))} ({c} channels)")
    if h == 0 or w == 0 or h > MAX_IMAGE_SIDE or w > MAX_IMAGE_SIDE:
        raise ObservationError(f"{key!r}: expected {expected}, got {_describe(np.asarray(value))} ({h}x{w} px)")
    if img.dtype.kind == "f":
        if not np.all(np.isfinite(img)):
            raise ObservationError(f"{key!r}: expected {expected}, got a float image with NaN or inf pixels")
        img = (255 * np.clip(img, 0.0, 1.0)).astype(np.uint8)
    # No copy here: a CHW frame stays a transposed view, which resize_with_pad resizes plane by plane.
    return img


def _resize_jobs(image: np.ndarray, height: int, width: int):
    """(output, [zero-argument jobs that fill it]) for one frame; no jobs when it is already the target size."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image, []
    ratio = max(w / width, h / height)
    new_h, new_w = int(h / ratio), int(w / ratio)
    top, left = max(0, int((height - new_h) / 2)), max(0, int((width - new_w) / 2))
    out = np.zeros((height, width, 3), dtype=np.uint8)
    window = out[top : top + new_h, left : left + new_w]
    planes = np.transpose(image, (2, 0, 1))
    if not image.flags.c_contiguous and planes.flags.c_contiguous:
        # A CHW frame (ALOHA's layout) seen as HWC: resize each contiguous channel plane ("L" mode)
        # instead of copying into interleaved RGB first. PIL's bilinear filter works per band with the same
        # integer arithmetic, so this equals the RGB resize pixel for pixel (tested), and skips a full-size copy.
        def plane(c):
            window[..., c] = np.asarray(Image.fromarray(planes[c]).resize((new_w, new_h), resample=Image.BILINEAR))

        return out, [lambda c=c: plane(c) for c in range(3)]

    def rgb():
        window[...] = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h), resample=Image.BILINEAR))

    return out, [rgb]


def resize_with_pad(image: np.ndarray, height: int = MODEL_IMAGE_SIZE, width: int = MODEL_IMAGE_SIZE) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [height, width, 3]: PIL bilinear resize keeping the aspect ratio, then
    centred zero padding. Matches openpi_client.image_tools.resize_with_pad pixel for pixel: the scale is
    `max(w / width, h / height)`, the new size is truncated with int(), the offset is int((target - new) / 2).
    """
    out, jobs = _resize_jobs(image, height, width)
    for job in jobs:
        job()
    return out


_POOL = None


def resize_many_with_pad(images: Sequence[np.ndarray], height: int = MODEL_IMAGE_SIZE, width: int = MODEL_IMAGE_SIZE) -> list[np.ndarray]:
    """resize_with_pad on several frames at once: PIL releases the GIL while resampling, so the channel
    planes of all cameras (up to 9 for ALOHA) run in parallel on a small thread pool."""
    global _POOL
    results = [_resize_jobs(img, height, width) for img in images]
    jobs = [job for _, js in results for job in js]
    if len(jobs) > 1:
        if _POOL is None:
            import concurrent.futures
            import os

            _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=min(9, os.cpu_count() or 1), thread_name_prefix="resize")
        for f in [_POOL.submit(job) for job in jobs]:
            f.result()
    else:
        for job in jobs:
            job()
    return [out for out, _ in results]


def image_to_model(image: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 in [-1, 1], as OpenPI's Observation.from_dict does."""
    return image.astype(np.float32) / 255.0 * 2.0 - 1.0


# ---------------------------------------------------------------------------------------------
# Delta actions
# ---------------------------------------------------------------------------------------------


def make_bool_mask(*dims: int) -> tuple[bool, ...]:
    """make_bool_mask(6, -1, 6, -1) -> six True, one False, six True, one False (OpenPI's helper)."""
    mask: list[bool] = []
    for d in dims:
        mask.extend([d > 0] * abs(d))
    return tuple(mask)


def _delta_offset(actions: np.ndarray, state: np.ndarray, mask: Sequence[bool]) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    n = mask.shape[-1]
    if actions.shape[-1] < n or state.shape[-1] < n:
        raise ValueError(f"delta mask covers {n} dims but actions have {actions.shape[-1]} and state {state.shape[-1]}")
    return np.where(mask, state[..., :n], 0)[..., None, :]  # broadcast over the horizon axis


def to_delta_actions(actions: np.ndarray, state: np.ndarray, mask: Sequence[bool] | None) -> np.ndarray:
    """Absolute [H, d] -> delta on the masked dims (delta = absolute - state). Returns a new array."""
    out = np.array(actions, copy=True)
    if mask is not None:
        n = len(mask)
        out[..., :n] -= _delta_offset(out, np.asarray(state), mask)
    return out


def to_absolute_actions(actions: np.ndarray, state: np.ndarray, mask: Sequence[bool] | None) -> np.ndarray:
    """Delta [H, d] -> absolute on the masked dims (absolute = delta + state). Returns a new array."""
    out = np.array(actions, copy=True)
    if mask is not None:
        n = len(mask)
        out[..., :n] += _delta_offset(out, np.asarray(state), mask)
    return out


# ---------------------------------------------------------------------------------------------
# ALOHA: the ALOHA runtime's joint/gripper space <-> the space pi0 was pretrained in
# ---------------------------------------------------------------------------------------------

# [left arm 6 joints, left gripper, right arm 6 joints, right gripper]
ALOHA_JOINT_FLIP = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1])
ALOHA_GRIPPER_DIMS = [6, 13]
# ALOHA's PUPPET_GRIPPER_POSITION_{CLOSED,OPEN} (linear, metres) and Interbotix's gripper linkage.
_GRIPPER_LINEAR_RANGE = (0.01844, 0.05800)
_GRIPPER_ARM_LENGTH, _GRIPPER_HORN_RADIUS = 0.036, 0.022
# pi0's gripper: encoder counts (2405, 3110) of 4096 around zero 2048, in radians.
_PI_GRIPPER_ANGLE_RANGE = (0.5476, 1.6296)
# ALOHA's PUPPET_GRIPPER_JOINT_{CLOSE,OPEN} (radians).
_ALOHA_GRIPPER_JOINT_RANGE = (-0.6213, 1.4910)


def _to_unit(x, lo, hi):
    return (x - lo) / (hi - lo)


def _from_unit(x, lo, hi):
    return x * (hi - lo) + lo


def gripper_to_angular(x):
    """Input side: ALOHA's normalized linear gripper position -> pi0's normalized gripper angle."""
    linear = _from_unit(x, *_GRIPPER_LINEAR_RANGE)
    a, r = _GRIPPER_ARM_LENGTH, _GRIPPER_HORN_RADIUS
    # Inverse of the Interbotix angle -> linear linkage; clipped because noisy readings leave [-1, 1].
    radians = np.arcsin(np.clip((r**2 + linear**2 - a**2) / (2 * r * linear), -1.0, 1.0))
    return _to_unit(radians, *_PI_GRIPPER_ANGLE_RANGE)


def gripper_to_angular_inv(y):
    """Exact inverse of `gripper_to_angular` (the Interbotix linkage itself) where the arcsin was not
    clipped: the positive root of x^2 - 2 r sin(theta) x + (r^2 - a^2) = 0."""
    s = np.sin(_from_unit(y, *_PI_GRIPPER_ANGLE_RANGE))
    a, r = _GRIPPER_ARM_LENGTH, _GRIPPER_HORN_RADIUS
    linear = r * s + np.sqrt(r**2 * s**2 - r**2 + a**2)
    return _to_unit(linear, *_GRIPPER_LINEAR_RANGE)


def gripper_from_angular(y):
    """Output side: pi0's gripper value -> ALOHA's normalized gripper joint. The model predicts radians
    offset by the closed position, so only the offset and ALOHA's joint range apply (no linkage)."""
    return _to_unit(y + _PI_GRIPPER_ANGLE_RANGE[0], *_ALOHA_GRIPPER_JOINT_RANGE)


def gripper_from_angular_inv(x):
    """Exact inverse of `gripper_from_angular` (OpenPI uses it to encode training actions)."""
    return _from_unit(x, *_ALOHA_GRIPPER_JOINT_RANGE) - _PI_GRIPPER_ANGLE_RANGE[0]


def aloha_state_to_pi(state: np.ndarray) -> np.ndarray:
    state = ALOHA_JOINT_FLIP * state
    state[ALOHA_GRIPPER_DIMS] = gripper_to_angular(state[ALOHA_GRIPPER_DIMS])
    return state


def aloha_actions_from_pi(actions: np.ndarray) -> np.ndarray:
    actions = ALOHA_JOINT_FLIP * actions
    actions[:, ALOHA_GRIPPER_DIMS] = gripper_from_angular(actions[:, ALOHA_GRIPPER_DIMS])
    return actions


def aloha_actions_to_pi(actions: np.ndarray) -> np.ndarray:
    """Inverse of `aloha_actions_from_pi` (training-side encoding; used by tests)."""
    actions = ALOHA_JOINT_FLIP * actions
    actions[:, ALOHA_GRIPPER_DIMS] = gripper_from_angular_inv(actions[:, ALOHA_GRIPPER_DIMS])
    return actions


# ---------------------------------------------------------------------------------------------
# Robot transforms
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RobotInputs:
    """What a robot transform hands on: uint8 HWC frames per model slot (not yet resized), their masks,
    the state in model space (float64, unnormalized, unpadded) and the prompt if the observation had one."""

    images: dict[str, np.ndarray]
    image_mask: dict[str, bool]
    state: np.ndarray
    prompt: object | None


class RobotTransform:
    name: str
    state_dim: int
    action_dim: int

    def inputs(self, obs: Mapping) -> RobotInputs:
        raise NotImplementedError

    def outputs(self, actions: np.ndarray) -> np.ndarray:
        """Model-space actions [H, 32] (unnormalized, absolute) -> robot actions [H, action_dim]."""
        return np.asarray(actions[:, : self.action_dim])


def _slots(base: np.ndarray, left: np.ndarray | None, right: np.ndarray | None):
    """Fill the three model slots; a missing camera is zeros shaped like the base frame, masked out."""
    frames = (base, left, right)
    absent = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), base.shape)  # zeros without allocating a frame
    images = {s: (f if f is not None else absent) for s, f in zip(IMAGE_SLOTS, frames)}
    mask = {s: f is not None for s, f in zip(IMAGE_SLOTS, frames)}
    return images, mask


class AlohaTransform(RobotTransform):
    """ALOHA: `state` [14], `images` {cam_high (required), cam_left_wrist, cam_right_wrist, cam_low}, CHW.
    cam_low is accepted and unused (pi0 has no slot for it)."""

    name = "aloha"
    state_dim = 14
    action_dim = 14
    CAMERAS = ("cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist")

    def __init__(self, adapt_to_pi: bool = True):
        self.adapt_to_pi = adapt_to_pi

    def inputs(self, obs: Mapping) -> RobotInputs:
        state = parse_vector(require(obs, "state", "a float array of shape (14,)"), "state", self.state_dim)
        cams = require(obs, "images", f"a dict of [3, H, W] images with keys among {self.CAMERAS}")
        if not isinstance(cams, Mapping):
            raise ObservationError(f"'images': expected a dict of [3, H, W] images keyed by camera, got {_describe(cams)}")
        unknown = sorted(set(map(str, cams)) - set(self.CAMERAS))
        if unknown:
            raise ObservationError(f"'images': expected camera names among {self.CAMERAS}, got unknown {unknown}")
        require(cams, "cam_high", "the cam_high camera (it fills the base slot)", prefix="images/")
        frames = {name: parse_image(img, f"images/{name}", layout="chw") for name, img in cams.items()}
        images, mask = _slots(frames["cam_high"], frames.get("cam_left_wrist"), frames.get("cam_right_wrist"))
        if self.adapt_to_pi:
            state = aloha_state_to_pi(state)
        return RobotInputs(images, mask, state, obs.get("prompt"))

    def outputs(self, actions: np.ndarray) -> np.ndarray:
        actions = np.asarray(actions[:, : self.action_dim])
        return aloha_actions_from_pi(actions) if self.adapt_to_pi else actions


class DroidTransform(RobotTransform):
    """DROID: exterior_image_1_left -> base, wrist_image_left -> left wrist; state = joints (7) + gripper (1)."""

    name = "droid"
    state_dim = 8
    action_dim = 8

    def inputs(self, obs: Mapping) -> RobotInputs:
        joints_key, grip_key = "observation/joint_position", "observation/gripper_position"
        joints = parse_vector(require(obs, joints_key, "a float array of shape (7,)"), joints_key, 7)
        # A bare float gripper is accepted too: clients often send the scalar they read from the robot.
        grip = parse_vector(require(obs, grip_key, "a float array of shape (1,)"), grip_key, 1, allow_scalar=True)
        base = self._image(obs, "observation/exterior_image_1_left")
        wrist = self._image(obs, "observation/wrist_image_left")
        images, mask = _slots(base, wrist, None)
        return RobotInputs(images, mask, np.concatenate([joints, grip]), obs.get("prompt"))

    @staticmethod
    def _image(obs, key):
        return parse_image(require(obs, key, "an [H, W, 3] uint8 image"), key, layout="auto")


class LiberoTransform(RobotTransform):
    """LIBERO: observation/image -> base, observation/wrist_image -> left wrist, observation/state [8]."""

    name = "libero"
    state_dim = 8
    action_dim = 7

    def inputs(self, obs: Mapping) -> RobotInputs:
        key = "observation/state"
        state = parse_vector(require(obs, key, "a float array of shape (8,)"), key, self.state_dim)
        base = parse_image(require(obs, "observation/image", "an [H, W, 3] uint8 image"), "observation/image")
        wrist_key = "observation/wrist_image"
        wrist = parse_image(require(obs, wrist_key, "an [H, W, 3] uint8 image"), wrist_key)
        images, mask = _slots(base, wrist, None)
        return RobotInputs(images, mask, state, obs.get("prompt"))


ROBOT_TRANSFORMS = {"aloha": AlohaTransform, "droid": DroidTransform, "libero": LiberoTransform}


def make_robot_transform(name: str, **kwargs) -> RobotTransform:
    if name not in ROBOT_TRANSFORMS:
        raise KeyError(f"unknown robot transform {name!r}; expected one of {', '.join(ROBOT_TRANSFORMS)}")
    return ROBOT_TRANSFORMS[name](**kwargs)


def parse_prompt(prompt) -> str:
    """str, UTF-8 bytes, or a 0-d numpy string array (what np.asarray(str) gives) -> str."""
    if isinstance(prompt, np.ndarray) and prompt.shape == () and prompt.dtype.kind in "US":
        prompt = prompt.item()
    if isinstance(prompt, bytes):
        try:
            return prompt.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ObservationError(f"'prompt': expected a str (or UTF-8 bytes), got bytes that are not UTF-8 ({e})") from e
    if not isinstance(prompt, str):
        raise ObservationError(f"'prompt': expected a str, got {_describe(prompt)}")
    return prompt
