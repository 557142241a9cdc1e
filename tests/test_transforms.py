"""Robot transforms: images (uint8/float, CHW/HWC, resize-with-pad vs PIL), gripper maps, delta actions."""

import numpy as np
import pytest
from openpi_client import image_tools
from PIL import Image

from pi0_triton_policy import transforms as T


def pil_reference_resize_with_pad(img: np.ndarray, size: int = 224) -> np.ndarray:
    """Independent reference, from OPENPI_SPEC section 4: scale by max(w/224, h/224), int() the new size,
    PIL bilinear, paste centred at int((224 - new) / 2) onto zeros."""
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    ratio = max(w / size, h / size)
    nw, nh = int(w / ratio), int(h / ratio)
    small = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    out = np.zeros((size, size, 3), np.uint8)
    top, left = int((size - nh) / 2), int((size - nw) / 2)
    out[top : top + nh, left : left + nw] = small
    return out


@pytest.mark.parametrize("hw", [(97, 131), (131, 97), (223, 225), (181, 321), (480, 640), (7, 1001), (50, 100), (225, 225)])
def test_resize_with_pad_matches_pil_to_the_pixel(hw):
    rng = np.random.default_rng(sum(hw))
    img = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    ours = T.resize_with_pad(img)
    ref = pil_reference_resize_with_pad(img)
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours, image_tools.resize_with_pad(img, 224, 224))  # openpi-client's own


@pytest.mark.parametrize("hw", [(97, 131), (480, 640), (7, 1001), (225, 225)])
def test_resize_of_a_chw_frame_view_matches_pil_to_the_pixel(hw):
    """ALOHA sends CHW; parse_image keeps it as a transposed view, resized plane by plane."""
    rng = np.random.default_rng(sum(hw) + 1)
    chw = rng.integers(0, 256, size=(3, *hw), dtype=np.uint8)
    view = T.parse_image(chw, "cam", layout="chw")
    assert not view.flags.c_contiguous  # really the per-plane path
    ref = pil_reference_resize_with_pad(np.ascontiguousarray(np.transpose(chw, (1, 2, 0))))
    np.testing.assert_array_equal(T.resize_with_pad(view), ref)


def test_resize_is_a_no_op_at_224():
    img = np.random.default_rng(0).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    assert T.resize_with_pad(img) is img


def test_resize_pads_with_black_bars_centred():
    img = np.full((100, 200, 3), 255, np.uint8)  # 2:1 -> 224x112 centred: rows 56..167
    out = T.resize_with_pad(img)
    assert (out[:56] == 0).all() and (out[168:] == 0).all() and (out[56:168] == 255).all()


def test_float_images_become_truncated_uint8_and_chw_becomes_hwc():
    rng = np.random.default_rng(1)
    f = rng.random((3, 20, 30), dtype=np.float32)
    got = T.parse_image(f, "img", layout="auto")
    expected = np.transpose((255 * f).astype(np.uint8), (1, 2, 0))  # OpenPI's conversion, then CHW -> HWC
    np.testing.assert_array_equal(got, expected)
    hwc = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(T.parse_image(hwc, "img", layout="auto"), hwc)
    np.testing.assert_array_equal(T.parse_image(np.transpose(hwc, (2, 0, 1)), "img", layout="chw"), hwc)
    # Out-of-range floats are clipped instead of wrapping around.
    np.testing.assert_array_equal(T.parse_image(np.full((4, 4, 3), 1.5), "img")[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(T.parse_image(np.full((4, 4, 3), -0.5), "img")[0, 0], [0, 0, 0])


def test_model_pixels_span_minus_one_to_one():
    px = T.image_to_model(np.array([0, 128, 255], np.uint8))
    assert px.dtype == np.float32
    np.testing.assert_allclose(px, [-1.0, 128 / 255 * 2 - 1, 1.0], atol=1e-6)  # float32 arithmetic


# -- ALOHA gripper maps -------------------------------------------------------------------------


def test_gripper_to_angular_round_trips():
    x = np.linspace(0.0, 1.0, 101)
    np.testing.assert_allclose(T.gripper_to_angular_inv(T.gripper_to_angular(x)), x, atol=1e-9)


def test_gripper_from_angular_round_trips_and_known_values():
    y = np.linspace(-1.0, 2.0, 61)
    np.testing.assert_allclose(T.gripper_from_angular_inv(T.gripper_from_angular(y)), y, atol=1e-12)
    # y = 0 is the closed angle 0.5476 rad on ALOHA's joint range [-0.6213, 1.4910].
    assert T.gripper_from_angular(0.0) == pytest.approx((0.5476 + 0.6213) / (1.4910 + 0.6213))
    # Fully closed linear position maps to ALOHA's linkage angle; fully open to arcsin(1) = pi/2.
    assert T.gripper_to_angular(1.0) == pytest.approx((np.pi / 2 - 0.5476) / (1.6296 - 0.5476), abs=1e-6)


def test_aloha_state_and_actions_flip_signs_and_map_grippers():
    state = np.arange(1, 15, dtype=np.float64) / 20  # grippers 0.35 and 0.7
    pi = T.aloha_state_to_pi(state.copy())
    flip = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1])
    joints = [i for i in range(14) if i not in (6, 13)]
    np.testing.assert_allclose(pi[joints], (flip * state)[joints])
    np.testing.assert_allclose(pi[[6, 13]], T.gripper_to_angular(state[[6, 13]]))

    actions = np.random.default_rng(2).normal(size=(5, 14))
    back = T.aloha_actions_to_pi(T.aloha_actions_from_pi(actions.copy()))
    np.testing.assert_allclose(back, actions, atol=1e-12)
    out = T.AlohaTransform().outputs(np.pad(actions, ((0, 0), (0, 18))))
    assert out.shape == (5, 14)
    np.testing.assert_allclose(out[:, joints], (flip * actions)[:, joints])
    np.testing.assert_allclose(out[:, [6, 13]], T.gripper_from_angular(actions[:, [6, 13]]))


# -- delta actions ------------------------------------------------------------------------------


def test_make_bool_mask():
    assert T.make_bool_mask(6, -1, 6, -1) == (True,) * 6 + (False,) + (True,) * 6 + (False,)
    assert T.make_bool_mask(2, 0, 2) == (True,) * 4


def test_delta_and_absolute_actions():
    mask = T.make_bool_mask(2, -1)
    state = np.array([10.0, 20.0, 30.0, 40.0])
    absolute = np.array([[11.0, 22.0, 33.0, 44.0], [12.0, 24.0, 36.0, 48.0]])
    delta = T.to_delta_actions(absolute, state, mask)
    np.testing.assert_array_equal(delta, [[1.0, 2.0, 33.0, 44.0], [2.0, 4.0, 36.0, 48.0]])
    np.testing.assert_array_equal(T.to_absolute_actions(delta, state, mask), absolute)
    np.testing.assert_array_equal(T.to_absolute_actions(delta, state, None), delta)  # absolute presets
    assert delta is not absolute and absolute[0, 0] == 11.0  # inputs untouched


# -- robot inputs -------------------------------------------------------------------------------


def test_aloha_inputs_mask_absent_cameras_and_ignore_cam_low():
    rng = np.random.default_rng(3)
    cam = lambda: rng.integers(0, 256, size=(3, 48, 64), dtype=np.uint8)  # noqa: E731
    obs = {"state": np.zeros(14), "images": {"cam_high": cam(), "cam_low": cam(), "cam_right_wrist": cam()}}
    r = T.AlohaTransform().inputs(obs)
    assert r.image_mask == {"base_0_rgb": True, "left_wrist_0_rgb": False, "right_wrist_0_rgb": True}
    np.testing.assert_array_equal(r.images["base_0_rgb"], np.transpose(obs["images"]["cam_high"], (1, 2, 0)))
    assert not r.images["left_wrist_0_rgb"].any() and r.images["left_wrist_0_rgb"].shape == (48, 64, 3)
    assert r.prompt is None


def test_droid_and_libero_inputs():
    rng = np.random.default_rng(4)
    img = lambda *s: rng.integers(0, 256, size=s, dtype=np.uint8)  # noqa: E731
    droid = T.DroidTransform().inputs({
        "observation/exterior_image_1_left": img(180, 320, 3),
        "observation/wrist_image_left": img(180, 320, 3),
        "observation/joint_position": np.arange(7.0),
        "observation/gripper_position": np.array([0.5]),
        "prompt": "x",
    })
    np.testing.assert_array_equal(droid.state, [0, 1, 2, 3, 4, 5, 6, 0.5])
    assert droid.image_mask == {"base_0_rgb": True, "left_wrist_0_rgb": True, "right_wrist_0_rgb": False}
    assert droid.prompt == "x"
    libero = T.LiberoTransform().inputs({
        "observation/image": img(224, 224, 3), "observation/wrist_image": img(224, 224, 3), "observation/state": np.ones(8),
    })
    assert libero.image_mask["right_wrist_0_rgb"] is False and libero.state.dtype == np.float64
    assert T.LiberoTransform().outputs(np.ones((50, 32))).shape == (50, 7)
    assert T.DroidTransform().outputs(np.ones((10, 32))).shape == (10, 8)


def test_prompt_parsing():
    assert T.parse_prompt("a") == "a"
    assert T.parse_prompt(b"caf\xc3\xa9") == "café"
    assert T.parse_prompt(np.asarray("hi")) == "hi"
    with pytest.raises(T.ObservationError, match="'prompt': expected a str, got int"):
        T.parse_prompt(3)


def test_resize_many_equals_one_by_one():
    """The threaded batch path (all cameras' planes at once) gives exactly the single-frame results."""
    rng = np.random.default_rng(5)
    frames = [
        T.parse_image(rng.integers(0, 256, size=(3, 480, 640), dtype=np.uint8), "a", layout="chw"),
        rng.integers(0, 256, size=(181, 321, 3), dtype=np.uint8),
        rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8),
        T.parse_image(rng.random((3, 97, 131)).astype(np.float32), "b", layout="chw"),
    ]
    for got, frame in zip(T.resize_many_with_pad(frames), frames):
        np.testing.assert_array_equal(got, T.resize_with_pad(frame))
