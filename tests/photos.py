"""Ordinary photos of one subject in the shapes cameras and phones make, for the runs a new user would try first."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw


# 4:3, 3:4, 16:9, 1:1 and a 21:9 panorama. At a 64 px resolution the wide ones get the 80x48 and 80x32 aspect
# buckets, under the 64 px side the FLUX.2 pipeline accepts for a reference image.
PHOTO_SIZES = [(640, 480), (480, 640), (1280, 720), (600, 600), (1050, 450)]


def photo_jpegs() -> list[tuple[str, bytes]]:
    """Five JPEG photos (name, bytes) of a disc on a backdrop, each of a different shape."""
    photos = []
    for i, (width, height) in enumerate(PHOTO_SIZES):
        photo = Image.new("RGB", (width, height), (40 * i, 120, 200 - 30 * i))
        ImageDraw.Draw(photo).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(230, 60, 40))
        data = io.BytesIO()
        photo.save(data, format="JPEG", quality=90)
        photos.append((f"photo-{i}.jpg", data.getvalue()))
    return photos
