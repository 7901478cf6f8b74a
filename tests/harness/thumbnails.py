"""Template thumbnails: a drawing of the workflow's graph (groups, nodes, links), not a model output.

ComfyUI's template browser shows ``/api/workflow_templates/<pack>/<name>.jpg`` for a pack's
template ``<name>.json`` (frontend ``getTemplateThumbnailUrl``; the server serves the workflows
folder statically), so each workflow gets a ``.jpg`` beside it, drawn from its own JSON.
"""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw, ImageFont

SIZE = (640, 360)
BACKGROUND = (32, 32, 36)
NODE = (53, 53, 58)
NODE_TITLE = (40, 40, 44)
NOTE = (68, 51, 34)
LINK = {"IMAGE": (100, 181, 246), "MASK": (129, 199, 132), "INT": (170, 238, 136), "FLOAT": (170, 238, 136),
        "STRING": (200, 200, 200), "CONDITIONING": (255, 173, 121), "LATENT": (255, 156, 249), "VAE": (255, 99, 99),
        "MODEL": (179, 157, 219), "CLIP": (255, 214, 0), "VIDEO": (100, 181, 246)}
DEFAULT_LINK = (230, 180, 80)
TITLE = 30
MARGIN = 12


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: float) -> str:
    """``text`` cut (with an ellipsis) to ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…" if text else ""


def _hex(colour: str, alpha: int) -> tuple[int, int, int, int]:
    colour = colour.lstrip("#")
    if len(colour) == 3:
        colour = "".join(c * 2 for c in colour)
    return int(colour[0:2], 16), int(colour[2:4], 16), int(colour[4:6], 16), alpha


def render(workflow: dict[str, Any], names: dict[str, str], caption: str) -> Image.Image:
    """The graph fitted into :data:`SIZE`, with ``caption`` along the bottom."""
    nodes = workflow["nodes"]
    boxes = {n["id"]: (n["pos"][0], n["pos"][1] - TITLE, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in nodes}
    extents = list(boxes.values()) + [(x, y, x + w, y + h) for x, y, w, h in (g["bounding"] for g in
                                                                              workflow["groups"])]
    left, top = min(b[0] for b in extents), min(b[1] for b in extents)
    right, bottom = max(b[2] for b in extents), max(b[3] for b in extents)
    caption_height = 34
    scale = min((SIZE[0] - 2 * MARGIN) / (right - left), (SIZE[1] - 2 * MARGIN - caption_height) / (bottom - top))

    pad_x = (SIZE[0] - 2 * MARGIN - (right - left) * scale) / 2
    pad_y = (SIZE[1] - 2 * MARGIN - caption_height - (bottom - top) * scale) / 2

    def at(x: float, y: float) -> tuple[float, float]:
        return MARGIN + pad_x + (x - left) * scale, MARGIN + pad_y + (y - top) * scale

    image = Image.new("RGB", SIZE, BACKGROUND)
    overlay = Image.new("RGBA", SIZE, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    small = _font(max(8, int(22 * scale)))
    for group in workflow["groups"]:
        x, y, w, h = group["bounding"]
        draw.rectangle([*at(x, y), *at(x + w, y + h)], fill=_hex(group["color"], 70), outline=_hex(group["color"], 200))
        draw.text(at(x + 10, y + 8), _fit(draw, group["title"], small, (w - 20) * scale), fill=(235, 235, 235, 255),
                  font=small)
    image.paste(overlay, (0, 0), overlay)
    draw = ImageDraw.Draw(image)
    by_id = {n["id"]: n for n in nodes}
    for _id, source, slot, target, target_slot, type_ in workflow["links"]:
        s, t = by_id[source], by_id[target]
        start = at(s["pos"][0] + s["size"][0], s["pos"][1] + 14 + 20 * slot)
        end = at(t["pos"][0], t["pos"][1] + 14 + 20 * target_slot)
        middle = (start[0] + end[0]) / 2
        points = [start, (middle, start[1]), (middle, end[1]), end]
        draw.line(points, fill=LINK.get(type_, DEFAULT_LINK), width=max(1, int(3 * scale)))
    for node in nodes:
        x0, y0, x1, y1 = boxes[node["id"]]
        note = node["type"] == "MarkdownNote"
        draw.rounded_rectangle([*at(x0, y0), *at(x1, y1)], radius=max(1, int(8 * scale)), fill=NOTE if note else NODE,
                               outline=(90, 90, 96))
        if not note:
            draw.rectangle([*at(x0, y0), *at(x1, y0 + TITLE)], fill=NODE_TITLE)
        title = "Note" if note else node.get("title") or names.get(node["type"], node["type"])
        draw.text(at(x0 + 8, y0 + 6), _fit(draw, title, small, (x1 - x0 - 16) * scale), fill=(220, 220, 220),
                  font=small)
    draw.rectangle([0, SIZE[1] - caption_height, SIZE[0], SIZE[1]], fill=(22, 22, 26))
    draw.text((MARGIN, SIZE[1] - caption_height + 8), caption, fill=(240, 240, 240), font=_font(16))
    return image
