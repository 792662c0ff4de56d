"""Caption templates: several natural paraphrases per video naming shape, colour, motion and sound."""

from __future__ import annotations

import numpy as np

from vidlang.data.synthetic.spec import VideoSpec

MOTION_PHRASES: dict[str, list[str]] = {
    "static": ["stays still", "does not move", "remains in place", "sits motionless"],
    "left": ["moves to the left", "slides left", "travels from right to left", "drifts leftward"],
    "right": ["moves to the right", "slides right", "travels from left to right", "drifts rightward"],
    "up": ["moves up", "rises", "travels from the bottom to the top", "floats upward"],
    "down": ["moves down", "falls", "travels from the top to the bottom", "sinks downward"],
    "grow": ["grows", "gets bigger", "expands", "grows larger"],
    "shrink": ["shrinks", "gets smaller", "contracts", "shrinks in size"],
    "clockwise": ["turns clockwise", "rotates clockwise", "spins clockwise", "rotates in the clockwise direction"],
    "counterclockwise": [
        "turns counter-clockwise",
        "rotates anticlockwise",
        "spins counterclockwise",
        "rotates in the counter-clockwise direction",
    ],
}
# trailing clause (after the motion)
SOUND_CLAUSES: dict[str, list[str]] = {
    "low": ["while a low hum plays", "with a deep tone in the background", "accompanied by a low-pitched tone",
            "as a low note sounds"],
    "high": ["while a high-pitched tone plays", "with a shrill whistle in the background", "accompanied by a high note",
             "as a high tone rings"],
    "beeping": ["while something beeps repeatedly", "with a series of beeps", "accompanied by steady beeping",
                "as a beeping sound repeats"],
    "silence": ["in silence", "with no sound", "without any audio", "silently"],
}  # fmt: skip
# a sentence about the sound
SOUND_SENTENCES: dict[str, list[str]] = {
    "low": ["a low tone can be heard", "a deep hum plays", "the sound is a low drone", "a low note hums"],
    "high": ["a high tone can be heard", "a high-pitched whistle plays", "the sound is a shrill tone",
             "a high note rings"],
    "beeping": ["beeps can be heard", "a beeping sound repeats", "the sound is a series of beeps",
                "something keeps beeping"],
    "silence": ["there is no sound", "it is completely silent", "nothing can be heard", "the clip has no sound"],
}  # fmt: skip
DISTRACTOR_PHRASES = ["next to {}", "near {}", "beside {}", "not far from {}"]

TEMPLATES = [
    "{a_obj} {motion}{distr} {sound}",
    "on a {bg} background, {a_obj}{distr} {motion} {sound}",
    "the {obj} {motion} {sound}{distr}",
    "video of {a_obj} that {motion}{distr}; {sound_sentence}",
    "{sound_sentence} while {a_obj} {motion}{distr}",
]


def with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text[0].upper() + text[1:] + "."


def make_captions(spec: VideoSpec, rng: np.random.Generator) -> list[str]:
    """One caption per template (5), phrase variants rotated so paraphrases differ."""
    m_off, s_off, d_off = (int(v) for v in rng.integers(0, 4, 3))
    obj = f"{spec.primary.color} {spec.primary.shape}"
    other = spec.distractor
    captions = []
    for i, template in enumerate(TEMPLATES):
        distr = ""
        if other is not None:
            distr = " " + DISTRACTOR_PHRASES[(i + d_off) % 4].format(with_article(f"{other.color} {other.shape}"))
        text = template.format(
            obj=obj,
            a_obj=with_article(obj),
            motion=MOTION_PHRASES[spec.motion][(i + m_off) % 4],
            sound=SOUND_CLAUSES[spec.sound][(i + s_off) % 4],
            sound_sentence=SOUND_SENTENCES[spec.sound][(i + s_off) % 4],
            distr=distr,
            bg=spec.background,
        )
        captions.append(_sentence(text))
    return captions
