"""Does a person word's attention fall on the people in the photo? Person grounding on real photos.

For every generated person word (man, woman, people, player, skier, ...) of a photo with known person
boxes, the word's *inside share* is the attention mass inside the union of the boxes, to be read
against the *box area*, the share of the grid those boxes cover: a uniform map scores exactly its
area (ratio 1.0), a map that looks only at people scores 1.0 (ratio 1 / area). *Peak on person*: how
often the map's largest cell has its centre inside a person box. Boxes are ``[cx, cy, w, h]``
fractions of the photo's width and height (COCO/YOLO order); sat resizes the whole photo to the
encoder's input, so a box maps straight onto the grid. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Single caption tokens that name one or more people. Plurals are listed: no stemming here.
PERSON_WORDS = frozenset("""
man men woman women person persons people boy boys girl girls child children kid kids baby babies
toddler toddlers guy guys lady ladies gentleman gentlemen adult adults teenager teenagers teen teens
player players skier skiers surfer surfers skateboarder skateboarders snowboarder snowboarders
rider riders biker bikers cyclist cyclists batter batters pitcher catcher umpire chef chefs cook
worker workers officer officers policeman soldier soldiers crowd couple family audience spectators
athlete athletes tourist tourists pedestrian pedestrians student students customer customers
someone climber climbers runner runners swimmer swimmers dancer dancers
""".split())


def _edges(box, gh: int, gw: int) -> tuple[float, float, float, float]:
    """[cx, cy, w, h] fractions -> (top, bottom, left, right) in grid cells, clipped to the grid."""
    cx, cy, w, h = (float(v) for v in box)
    top, bottom = np.clip([(cy - h / 2) * gh, (cy + h / 2) * gh], 0, gh)
    left, right = np.clip([(cx - w / 2) * gw, (cx + w / 2) * gw], 0, gw)
    return float(top), float(bottom), float(left), float(right)


def box_coverage(boxes, gh: int, gw: int, samples: int = 16) -> np.ndarray:
    """(gh, gw): the share of each grid cell covered by the union of ``boxes``, measured on
    ``samples`` x ``samples`` points per cell (exact for boxes whose edges fall on that lattice)."""
    ys = (np.arange(gh * samples) + 0.5) / samples  # sample points, in cells
    xs = (np.arange(gw * samples) + 0.5) / samples
    inside = np.zeros((gh * samples, gw * samples), dtype=bool)
    for box in boxes:
        top, bottom, left, right = _edges(box, gh, gw)
        inside |= ((ys >= top) & (ys < bottom))[:, None] & ((xs >= left) & (xs < right))[None, :]
    return inside.reshape(gh, samples, gw, samples).mean(axis=(1, 3))


def centre_inside(boxes, gh: int, gw: int) -> np.ndarray:
    """(gh, gw) bool: the cells whose centre lies inside a box."""
    ys, xs = np.arange(gh) + 0.5, np.arange(gw) + 0.5
    inside = np.zeros((gh, gw), dtype=bool)
    for box in boxes:
        top, bottom, left, right = _edges(box, gh, gw)
        inside |= ((ys >= top) & (ys < bottom))[:, None] & ((xs >= left) & (xs < right))[None, :]
    return inside


@dataclass
class GroundedWord:
    photo: int
    word: str
    inside: float  # attention mass inside the person boxes
    area: float  # share of the grid the boxes cover
    peak_on_person: bool


@dataclass
class GroundingResult:
    photos: int = 0
    words: int = 0  # generated words, all of them
    scored: list[GroundedWord] = field(default_factory=list)

    @property
    def inside(self) -> float:
        return float(np.mean([s.inside for s in self.scored])) if self.scored else float("nan")

    @property
    def area(self) -> float:
        return float(np.mean([s.area for s in self.scored])) if self.scored else float("nan")

    @property
    def ratio(self) -> float:
        """Mean inside share over mean box area: 1.0 for uniform maps, higher when they find people."""
        return self.inside / self.area if self.scored and self.area > 0 else float("nan")

    @property
    def peak(self) -> float:
        return float(np.mean([s.peak_on_person for s in self.scored])) if self.scored else float("nan")

    def to_dict(self) -> dict:
        return {"photos": self.photos, "words": self.words, "person_words": len(self.scored),
                "inside_share": round(self.inside, 4), "box_area": round(self.area, 4),
                "grounding_ratio": round(self.ratio, 4), "peak_on_person": round(self.peak, 4)}


def score(captions: list[tuple[list[str], np.ndarray]], boxes: list[list]) -> GroundingResult:
    """captions[i] = (words, maps (len(words), gh, gw)) of photo i; boxes[i] = its person boxes
    (``[cx, cy, w, h]`` fractions; photos without boxes are skipped)."""
    result = GroundingResult(photos=len(captions))
    for i, ((words, maps), photo_boxes) in enumerate(zip(captions, boxes)):
        result.words += len(words)
        if not photo_boxes or not len(words):
            continue
        gh, gw = np.asarray(maps).shape[1:]
        cover, centres = box_coverage(photo_boxes, gh, gw), centre_inside(photo_boxes, gh, gw)
        for word, alpha in zip(words, maps):
            if word not in PERSON_WORDS:
                continue
            a = np.asarray(alpha, dtype=np.float64)
            a = a / a.sum() if a.sum() > 0 else np.full_like(a, 1 / a.size)
            peak = np.unravel_index(int(np.argmax(a)), a.shape)
            result.scored.append(GroundedWord(i, word, float((a * cover).sum()), float(cover.mean()),
                                              bool(centres[peak])))
    return result
