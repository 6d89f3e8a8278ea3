"""One articulated SynthPose figure: a 3-D stick body posed within joint limits, projected
orthographically and drawn with OpenCV (docs/methods.md section 1.6, the embedded dataset).

Body frame: +x is the person's LEFT, +y up, +z the way the person faces; the camera looks down
-z, so a figure facing the camera (yaw 0) shows its left side on the image's right. Left and right
are told apart only by geometry (face and torso front, elbows bending forward, knees backward,
feet pointing forward), never by colour, so a mirrored figure is again a valid figure:
``Figure.mirrored()`` is exactly the horizontal mirror image with left and right swapped.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import cv2
import numpy as np

SH = 4                       # fixed-point bits for sub-pixel OpenCV drawing
SIDE_P = .25                 # chance of a figure at any yaw (side views); SynthPose default
BACK_P = .25                 # chance of a figure turned away from the camera
PARTS = ("head", "torso", "neck", "l_uarm", "r_uarm", "l_farm", "r_farm", "l_hand", "r_hand",
         "l_thigh", "r_thigh", "l_shin", "r_shin", "l_foot", "r_foot")
PART = {n: i for i, n in enumerate(PARTS)}
# COCO-17 joint -> the parts whose pixels mean "this joint is seen" (anything else on top hides it)
JOINT_PARTS = ([("head",)] * 5
               + [("torso", "l_uarm"), ("torso", "r_uarm"), ("l_uarm", "l_farm"),
                  ("r_uarm", "r_farm"), ("l_farm", "l_hand"), ("r_farm", "r_hand"),
                  ("torso", "l_thigh"), ("torso", "r_thigh"), ("l_thigh", "l_shin"),
                  ("r_thigh", "r_shin"), ("l_shin", "l_foot"), ("r_shin", "r_foot")])
# Face points in the head frame (units of body height) and the surface normals that decide
# whether the head itself hides them: nose, eyes (L, R), ears (L, R).
FACE = np.array([[0, -.012, .068], [.022, .008, .056], [-.022, .008, .056],
                 [.062, 0, -.008], [-.062, 0, -.008]])
FACE_N = np.array([[0, 0, 1], [.37, 0, .93], [-.37, 0, .93], [.99, 0, -.1], [-.99, 0, -.1]])
FACE_MIN_Z = np.array([-.25, .05, .05, -.5, -.5])   # normal . camera above this -> not self-hidden


def _rx(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _ry(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rz(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


@dataclass(frozen=True)
class Look:
    """Colours (BGR) and clothing; left and right limbs always share colours."""
    skin: tuple
    hair: tuple
    shirt: tuple
    pants: tuple
    shoes: tuple
    mark: tuple                  # the front zip line
    long_sleeves: bool
    shorts: bool
    stripes: int                 # 0 = plain shirt, else the number of stripes


@dataclass(frozen=True)
class Figure:
    """Pose (radians) and proportions (fractions of body height) of one person.

    arms[s] = (flex, abduction, humeral rotation, elbow) and legs[s] = (flex, abduction, twist,
    knee) for s = 0 left, 1 right; spine = (pitch, roll, twist); head = (yaw, pitch)."""
    cx: float                    # pelvis pixel
    cy: float
    height: float                # pixels per body height
    yaw: float                   # 0 = facing the camera, pi/2 = facing image right
    roll: float                  # in-plane lean of the whole body
    spine: tuple
    head: tuple
    arms: tuple
    legs: tuple
    body: tuple   # shoulder & hip half-width, torso, upper arm, forearm, thigh, shin, head r, build
    look: Look

    def mirrored(self, width: int) -> Figure:
        """The horizontal mirror image in an image ``width`` wide (left and right swapped)."""
        (p, r, t), (hy, hp) = self.spine, self.head
        return replace(self, cx=width - 1 - self.cx, yaw=-self.yaw, roll=-self.roll,
                       spine=(p, -r, -t), head=(-hy, hp), arms=self.arms[::-1],
                       legs=self.legs[::-1])


@lru_cache(maxsize=512)
def pose3d(f: Figure) -> dict[str, np.ndarray]:
    """Forward kinematics: named 3-D points (camera axes, body-height units, pelvis at 0).
    Cached per figure: callers must not modify the arrays."""
    sh, hh, tl, ua, fa, th, sn, hr, _ = f.body
    G = _rz(f.roll) @ _ry(f.yaw)
    S = G @ _ry(f.spine[2]) @ _rx(f.spine[0]) @ _rz(f.spine[1])
    Hd = S @ _ry(f.head[0]) @ _rx(f.head[1])
    neck = S @ [0, tl, 0]
    head_c = neck + S @ [0, .035, 0] + Hd @ [0, hr, 0]
    P = {"neck": neck, "neck_lo": S @ [0, tl - .03, 0], "head": head_c, "Hd": Hd, "S": S, "G": G}
    for s, side in ((1, "l"), (-1, "r")):
        fl, ab, ro, el = f.arms[0 if s > 0 else 1]
        A = S @ _rz(s * ab) @ _rx(-fl) @ _ry(s * ro)
        F = A @ _rx(-el)
        P[side + "sho"] = S @ [s * sh, tl - .015, 0]
        P[side + "elb"] = P[side + "sho"] + A @ [0, -ua, 0]
        P[side + "wri"] = P[side + "elb"] + F @ [0, -fa, 0]
        P[side + "fin"] = P[side + "wri"] + F @ [0, -.05, 0]
        lf, la, lt, kn = f.legs[0 if s > 0 else 1]
        L = G @ _rz(s * la) @ _rx(-lf) @ _ry(s * lt)
        K = L @ _rx(kn)
        P[side + "hip"] = G @ [s * hh, 0, 0]
        P[side + "kne"] = P[side + "hip"] + L @ [0, -th, 0]
        P[side + "ank"] = P[side + "kne"] + K @ [0, -sn, 0]
        P[side + "toe"] = P[side + "ank"] + K @ [0, -.03, .07]
    return P


def keypoints(f: Figure, P: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """COCO-17 pixel keypoints (17, 2) and, per joint, whether the figure's own head does NOT
    hide it (17,) bool (only face points can be self-hidden this way)."""
    P = pose3d(f) if P is None else P
    face = P["head"] + FACE @ P["Hd"].T * (f.body[7] / .062)
    pts = [*face] + [P[s + j] for j in ("sho", "elb", "wri", "hip", "kne", "ank") for s in "lr"]
    uv = project(f, np.array(pts))[:, :2]
    front = np.ones(17, bool)
    front[:5] = (FACE_N @ P["Hd"].T)[:, 2] > FACE_MIN_Z
    return uv.astype(np.float32), front


def project(f: Figure, X: np.ndarray) -> np.ndarray:
    """(N, 3) body points -> (N, 3) pixel u, v and depth (larger = nearer the camera)."""
    X = np.atleast_2d(X)
    return np.stack([f.cx + X[:, 0] * f.height, f.cy - X[:, 1] * f.height, X[:, 2]], 1)


@lru_cache(maxsize=512)
def parts(f: Figure) -> list[tuple]:
    """Drawable primitives, far to near: (depth, part id, kind, geometry, colour). Cached."""
    P, lk, h = pose3d(f), f.look, f.height
    sh, hh, tl, b = *f.body[:3], f.body[8]
    pr = lambda x: np.array([f.cx + x[0] * h, f.cy - x[1] * h, x[2]])  # noqa: E731
    out = []

    def cap(name, a, b, w, col, bias=0.0):
        pa, pb = pr(P[a] if isinstance(a, str) else a), pr(P[b] if isinstance(b, str) else b)
        out.append(((pa[2] + pb[2]) / 2 + bias, PART[name], "cap", (pa[:2], pb[:2], w * h), col))

    S, G = P["S"], P["G"]
    corners = [S @ [x * sh, tl + .01, z] for x in (-1, 1) for z in (-.055, .055)] + \
              [G @ [x * (hh + .03), -.06, z] for x in (-1, 1) for z in (-.06, .06)]
    uv = project(f, np.array(corners))
    out.append((uv[:, 2].mean() - .03, PART["torso"], "torso", uv[:, :2], lk.shirt))
    cap("neck", "neck_lo", P["head"] - S @ [0, .03, 0], .05, lk.skin, -.01)
    out.append((pr(P["head"])[2] + .02, PART["head"], "head", None, None))
    farm = lk.shirt if lk.long_sleeves else lk.skin
    for s in "lr":
        cap(s + "_uarm", s + "sho", s + "elb", .06 * b, lk.shirt)
        cap(s + "_farm", s + "elb", s + "wri", .05 * b, farm)
        cap(s + "_hand", s + "wri", s + "fin", .045 * b, lk.skin, .001)
        cap(s + "_thigh", s + "hip", s + "kne", .09 * b, lk.pants, -.04)
        cap(s + "_shin", s + "kne", s + "ank", .07 * b, lk.skin if lk.shorts else lk.pants)
        cap(s + "_foot", s + "ank", s + "toe", .05 * b, lk.shoes, .001)
    return sorted(out, key=lambda p: p[0])


def _fx(p) -> tuple[int, int]:
    return int(round(p[0] * (1 << SH))), int(round(p[1] * (1 << SH)))


def draw(f: Figure, img: np.ndarray | None, labels: np.ndarray | None, label_base: int = 0) -> None:
    """Draw the figure into ``img`` (H, W, 3) uint8 BGR (anti-aliased, shaded) and/or write
    ``label_base + part id + 1`` into ``labels`` (H, W) uint8 for the pixels it covers."""
    for _, pid, kind, geo, col in parts(f):
        lab = label_base + pid + 1
        if kind == "cap":
            a, b, w = _fx(geo[0]), _fx(geo[1]), max(2, int(round(geo[2])))
            if img is not None:   # dark rim, fill, lighter core: a shaded tube
                cv2.line(img, a, b, _shade(col, .55), w + 2, cv2.LINE_AA, SH)
                cv2.line(img, a, b, col, w, cv2.LINE_AA, SH)
                if w >= 5:
                    cv2.line(img, a, b, _shade(col, 1.25), max(1, w // 3), cv2.LINE_AA, SH)
            if labels is not None:
                cv2.line(labels, a, b, lab, w, cv2.LINE_8, SH)
        elif kind == "torso":
            hull = cv2.convexHull(np.round(geo * (1 << SH)).astype(np.int32))
            if img is not None:
                cv2.fillConvexPoly(img, hull, col, cv2.LINE_AA, SH)
                _torso_detail(f, img, hull)
                cv2.polylines(img, [hull], True, _shade(col, .55), 1, cv2.LINE_AA, SH)
            if labels is not None:
                cv2.fillConvexPoly(labels, hull, lab, cv2.LINE_8, SH)
        else:
            _draw_head(f, img, labels, lab)


def _shade(col, k: float) -> tuple:
    return tuple(int(min(255, c * k)) for c in col)


def _torso_detail(f: Figure, img: np.ndarray, hull: np.ndarray) -> None:
    """Stripes (any side) and the FRONT marking: a V collar and a zip line, drawn only when the
    chest faces the camera; this is the torso's front/back cue."""
    P, lk = pose3d(f), f.look
    S, tl = P["S"], f.body[2]
    pr = lambda x: _fx(project(f, x)[0])  # noqa: E731
    if lk.stripes:
        x0, y0, w, hgt = cv2.boundingRect(hull >> SH)
        roi = img[max(y0, 0):y0 + hgt + 1, max(x0, 0):x0 + w + 1]
        if roi.size:
            mask, over = np.zeros(roi.shape[:2], np.uint8), roi.copy()
            off = np.array([max(x0, 0), max(y0, 0)]) << SH
            cv2.fillConvexPoly(mask, hull - off, 1, cv2.LINE_8, SH)
            for k in range(lk.stripes):
                y = tl - (k + .5) * (tl + .06) / lk.stripes
                a = np.array(pr(S @ [-.3, y, 0])) - off
                b = np.array(pr(S @ [.3, y, 0])) - off
                cv2.line(over, tuple(a), tuple(b), _shade(lk.shirt, .6),
                         max(1, int(f.height * .018)), cv2.LINE_AA, SH)
            roi[mask > 0] = over[mask > 0]
    if (S @ [0, 0, 1])[2] > .15:                        # chest toward the camera
        z = .052
        v = [pr(S @ p) for p in ([-.045, tl + .005, z], [0, tl - .08, z], [.045, tl + .005, z])]
        cv2.fillConvexPoly(img, np.array(v), lk.skin, cv2.LINE_AA, SH)
        cv2.line(img, pr(S @ [0, tl - .08, z]), pr(P["G"] @ [0, -.05, .06]), lk.mark,
                 max(1, int(f.height * .014)), cv2.LINE_AA, SH)


def _draw_head(f: Figure, img: np.ndarray | None, labels: np.ndarray | None, lab: int) -> None:
    """Shaded sphere: skin on the face side below the hairline, hair elsewhere, with eyes,
    nose, mouth and ears where they face the camera (the face-direction cue)."""
    P, lk = pose3d(f), f.look
    c, r = project(f, P["head"])[0], f.body[7] * f.height
    face_uv, front = keypoints(f, P)
    dot = max(1.0, .011 * f.height)
    if labels is not None:    # the sphere plus the nose and ears that stick out of it
        cv2.circle(labels, _fx(c), int(round(r * (1 << SH))), lab, -1, cv2.LINE_8, SH)
        for j in (0, 3, 4):
            if front[j]:
                cv2.circle(labels, _fx(face_uv[j]), int(dot * 1.3 * (1 << SH)), lab, -1,
                           cv2.LINE_8, SH)
    if img is None:
        return
    H, W = img.shape[:2]
    x0, y0 = max(int(c[0] - r - 1), 0), max(int(c[1] - r - 1), 0)
    x1, y1 = min(int(c[0] + r + 2), W), min(int(c[1] + r + 2), H)
    if x1 > x0 and y1 > y0:
        ys, xs = np.mgrid[y0:y1, x0:x1]
        dx, dy = (xs - c[0]) / r, (ys - c[1]) / r
        d = np.sqrt(dx * dx + dy * dy)
        alpha = np.clip((1 - d) * r + .5, 0, 1)[..., None]
        nz = np.sqrt(np.clip(1 - d * d, 0, 1))
        n_h = np.stack([dx, -dy, nz], -1) @ P["Hd"]           # normal in the head frame
        face = (n_h[..., 2] > .25) & (n_h[..., 1] < .4)
        col = np.where(face[..., None], lk.skin, lk.hair) * (.6 + .4 * nz)[..., None]
        roi = img[y0:y1, x0:x1]
        roi[:] = np.round(roi * (1 - alpha) + col * alpha).astype(np.uint8)
    for j, col in ((3, _shade(lk.skin, .85)), (4, _shade(lk.skin, .85)), (0, _shade(lk.skin, .8)),
                   (1, (25, 25, 25)), (2, (25, 25, 25))):
        if front[j]:
            rad = dot * (1.3 if j in (0, 3, 4) else 1.0)
            cv2.circle(img, _fx(face_uv[j]), int(rad * (1 << SH)), col, -1, cv2.LINE_AA, SH)
    if front[0]:                                           # mouth below the nose
        m = project(f, P["head"] + P["Hd"] @ [0, -.035, .055] * (f.body[7] / .062))[0]
        cv2.circle(img, _fx(m), int(dot * .8 * (1 << SH)), (40, 40, 110), -1, cv2.LINE_AA, SH)


# Pose archetypes, degrees: arms (flex, abduction, rotation, elbow) L, R; legs (flex, abduction,
# twist, knee) L, R; spine pitch. Asymmetric ones are mirrored at random, so no side is favoured.
_STAND_LEGS = ((0, 5, 0, 5), (0, 5, 0, 5))
ARCHETYPES = {
    "stand": (((5, 12, 0, 10), (5, 12, 0, 10)), _STAND_LEGS, 0),
    "walk": (((30, 10, 0, 25), (-25, 10, 0, 15)), ((-20, 4, 0, 10), (25, 4, 0, 30)), 5),
    "run": (((55, 15, 0, 95), (-40, 15, 0, 85)), ((-25, 5, 0, 70), (60, 5, 0, 80)), 15),
    "arms_up": (((160, 30, 0, 15), (160, 30, 0, 15)), _STAND_LEGS, 0),
    "wave": (((20, 110, 80, 70), (5, 12, 0, 10)), _STAND_LEGS, 0),
    "arms_out": (((0, 90, 0, 5), (0, 90, 0, 5)), ((0, 12, 0, 5), (0, 12, 0, 5)), 0),
    "hips": (((0, 45, -80, 110), (0, 45, -80, 110)), ((0, 8, 0, 5), (0, 8, 0, 5)), 0),
    "squat": (((70, 10, 0, 30), (70, 10, 0, 30)), ((100, 20, 0, 120), (100, 20, 0, 120)), 30),
    "sit": (((30, 10, 0, 60), (30, 10, 0, 60)), ((85, 10, 0, 90), (85, 10, 0, 90)), -5),
    "kick": (((20, 45, 0, 30), (-10, 40, 0, 20)), ((80, 5, 0, 10), (0, 5, 0, 5)), -10),
    "reach": (((90, 5, 0, 5), (10, 12, 0, 15)), _STAND_LEGS, 10),
    "bend": (((70, 5, 0, 5), (70, 5, 0, 5)), ((0, 5, 0, 0), (0, 5, 0, 0)), 55),
}
ARM_LIM = np.radians([(-50, 180), (-10, 170), (-90, 90), (0, 150)])
LEG_LIM = np.radians([(-35, 125), (-10, 50), (-25, 25), (0, 145)])
SKIN = ((196, 224, 255), (160, 194, 241), (125, 172, 224), (90, 134, 198), (54, 85, 141),
        (38, 56, 90))                                   # BGR, light to dark
HAIR = ((20, 20, 25), (30, 40, 60), (40, 70, 110), (120, 190, 220), (170, 170, 170), (30, 60, 150))


def _limb(rng, mean_deg, lim) -> tuple:
    """Archetype angles + noise, or (sometimes) anything within the joint limits."""
    if rng.random() < .1:
        return tuple(float(v) for v in rng.uniform(lim[:, 0], lim[:, 1]))
    a = np.radians(mean_deg) + rng.normal(0, np.radians([15, 12, 20, 15]))
    return tuple(float(v) for v in np.clip(a, lim[:, 0], lim[:, 1]))


def _colour(rng, lo_v=.25) -> tuple:
    hsv = np.array([[[rng.integers(0, 180), rng.integers(40, 256),
                      rng.integers(int(lo_v * 255), 256)]]], np.uint8)
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def sample_look(rng) -> Look:
    skin = np.clip(np.array(SKIN[rng.integers(len(SKIN))]) + rng.integers(-12, 13, 3), 0, 255)
    lum = lambda c: .11 * c[0] + .59 * c[1] + .3 * c[2]  # noqa: E731
    hairs = [h for h in HAIR if abs(lum(h) - lum(skin)) > 60] or [HAIR[0], HAIR[3]]
    hair = hairs[rng.integers(len(hairs))]
    shirt = _colour(rng)
    mark = tuple(255 - c for c in shirt) if rng.random() < .5 else _colour(rng)
    return Look(skin=tuple(int(c) for c in skin), hair=tuple(hair), shirt=shirt,
                pants=_colour(rng, .15), shoes=_colour(rng, .1), mark=mark,
                long_sleeves=bool(rng.random() < .5), shorts=bool(rng.random() < .3),
                stripes=int(rng.choice([0, 0, 0, 3, 4, 5])))


def sample_figure(rng, cx: float, cy: float, height: float, side_p: float = SIDE_P,
                  back_p: float = BACK_P) -> Figure:
    """A random person: any yaw with chance ``side_p``, turned away from the camera with chance
    ``back_p``, else facing it; both sides equally."""
    arms, legs, pitch = ARCHETYPES[list(ARCHETYPES)[rng.integers(len(ARCHETYPES))]]
    if rng.random() < .5:
        arms, legs = arms[::-1], legs[::-1]
    u, front = rng.random(), 1 - side_p - back_p
    yaw = rng.normal(0, .6) if u < front else np.pi + rng.normal(0, .6) if u < 1 - side_p \
        else rng.uniform(-np.pi, np.pi)
    roll = rng.normal(0, .1) if rng.random() < .9 else rng.normal(0, .4)
    spine = (float(np.clip(np.radians(pitch) + rng.normal(0, .12), -.25, 1.05)),
             float(rng.normal(0, .08)), float(np.clip(rng.normal(0, .2), -.5, .5)))
    head = (float(np.clip(rng.normal(0, .35), -1, 1)), float(np.clip(rng.normal(0, .2), -.4, .5)))
    body = tuple(float(rng.uniform(a, b)) for a, b in (
        (.10, .125), (.075, .095), (.28, .31), (.155, .18), (.135, .16), (.225, .26),
        (.225, .26), (.056, .068), (.9, 1.2)))
    return Figure(cx=float(cx), cy=float(cy), height=float(height), yaw=float(yaw),
                  roll=float(roll), spine=spine, head=head,
                  arms=tuple(_limb(rng, a, ARM_LIM) for a in arms),
                  legs=tuple(_limb(rng, g, LEG_LIM) for g in legs), body=body,
                  look=sample_look(rng))


@lru_cache(maxsize=512)
def extent(f: Figure) -> np.ndarray:
    """Pixel box (x0, y0, x1, y1) around everything ``draw`` paints for the figure."""
    lo, hi = np.full(2, np.inf), np.full(2, -np.inf)
    for _, _, kind, geo, _ in parts(f):
        if kind == "cap":
            pts, pad = np.array(geo[:2]), geo[2] / 2 + 1
        elif kind == "torso":
            pts, pad = geo, 1.0
        else:
            pts, pad = project(f, pose3d(f)["head"])[:, :2], f.body[7] * f.height * 1.15 + 1
        lo, hi = np.minimum(lo, pts.min(0) - pad), np.maximum(hi, pts.max(0) + pad)
    return np.concatenate([lo, hi])
