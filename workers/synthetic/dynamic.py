"""Dynamic phantoms: echocardiography-like cine loops of a beating left ventricle with known EF.

A loop shows an apical long-axis view: the blood pool (dark) inside an ellipsoidal cavity, the
myocardium (bright) around it, surrounding tissue, all under ultrasound speckle inside a fan-shaped
field of view. The cavity's short and long semi-axes shrink through systole and recover in diastole;
the ventricle is modelled as an ellipsoid of revolution, so its volume is ``4/3 * pi * a^2 * b``
(the area-length method's model) and the ground-truth ejection fraction is
``(EDV - ESV) / EDV``. Heart rate, frame rate, start phase, size, position, tilt, wall thickness,
gain and the share of long- versus short-axis shortening vary from loop to loop.

``write_us_multiframe`` stores a loop as an Ultrasound Multi-frame Image (8-bit MONOCHROME2, Cine
module with Frame Time, an ultrasound calibration region giving the pixel size), which is what an
echo machine sends to a PACS.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from workers.synthetic.phantoms import phantom_header

US_MULTIFRAME_STORAGE = "1.2.840.10008.5.1.4.1.1.3.1"

# Echo intensities (before speckle): blood pool, myocardium, surrounding tissue.
BLOOD, MYOCARDIUM, TISSUE = 0.07, 0.75, 0.32


@dataclass
class CineLoop:
    """One cine loop with its ground truth."""

    frames: np.ndarray  # (t, rows, cols) uint8, 0..255
    frame_time_s: float
    pixel_spacing_mm: float  # isotropic
    ef_percent: float  # ground truth, from the true end-diastolic and end-systolic volumes
    volumes_ml: np.ndarray  # (t,) LV volume at each frame, ml
    heart_rate_bpm: float


def contraction(phase: np.ndarray, systole_share: float) -> np.ndarray:
    """Contraction in [0, 1] over the cardiac phase in [0, 1): 0 at end-diastole, 1 at end-systole.

    Systole (ejection) takes ``systole_share`` of the cycle; diastole refills more slowly. Both are
    half-cosine ramps, so the volume curve has flat ends like a real one.
    """
    phase = np.mod(phase, 1.0)
    up = 0.5 - 0.5 * np.cos(np.pi * np.clip(phase / systole_share, 0, 1))
    down = 0.5 + 0.5 * np.cos(np.pi * np.clip((phase - systole_share) / (1 - systole_share), 0, 1))
    return np.where(phase < systole_share, up, down)


def axis_shortening_for_ef(ef: float, long_to_short: float) -> tuple[float, float]:
    """Short- and long-axis fractional shortening that give ejection fraction ``ef`` (0..1).

    Volume scales as a^2 b, so ``(1 - s_a)^2 (1 - r s_a) = 1 - ef`` is solved for s_a by bisection.
    """
    lo, hi = 0.0, 0.95
    for _ in range(60):
        mid = (lo + hi) / 2
        if (1 - mid) ** 2 * (1 - long_to_short * mid) > 1 - ef:
            lo = mid
        else:
            hi = mid
    s_a = (lo + hi) / 2
    return s_a, long_to_short * s_a


def ellipsoid_volume_ml(a_mm: float | np.ndarray, b_mm: float | np.ndarray) -> np.ndarray:
    """Volume of an ellipsoid of revolution with semi-axes a, a, b (mm) in ml."""
    return 4.0 / 3.0 * np.pi * np.asarray(a_mm) ** 2 * np.asarray(b_mm) / 1000.0


def _speckle(rng: np.random.Generator, shape: tuple[int, ...], correlation_px: float) -> np.ndarray:
    """Fully developed speckle: the magnitude of smoothed complex Gaussian noise, mean about 1."""
    sigma = (0, correlation_px, correlation_px * 0.6)
    re = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    im = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    mag = np.hypot(re, im)
    return mag / (mag.mean() + 1e-6)


def make_cine(
    rng: np.random.Generator, size: int = 64, n_frames: int = 32, ef_range: tuple[float, float] = (15.0, 75.0)
) -> CineLoop:
    """Generate one cine loop of ``n_frames`` frames of ``size`` x ``size`` pixels."""
    ef = rng.uniform(*ef_range) / 100.0
    heart_rate = rng.uniform(50, 110)
    cycle_s = 60.0 / heart_rate
    # At least one full cycle, so the loop holds an end-diastole and an end-systole.
    cycles = rng.uniform(1.05, 1.6)
    frame_time = cycles * cycle_s / n_frames
    t = np.arange(n_frames) * frame_time
    phase = t / cycle_s + rng.uniform(0, 1)
    c = contraction(phase, systole_share=rng.uniform(0.3, 0.42))

    fov_mm = rng.uniform(110, 150)
    spacing = fov_mm / size
    a_ed = rng.uniform(22, 30)  # short semi-axis, mm (end-diastolic diameter 44-60 mm)
    b_ed = a_ed * rng.uniform(1.6, 2.0)  # long semi-axis
    s_a, s_b = axis_shortening_for_ef(ef, rng.uniform(0.25, 0.65))
    a = a_ed * (1 - s_a * c)
    b = b_ed * (1 - s_b * c)
    wall_ed = rng.uniform(7, 11)
    # The muscle keeps its area: the wall thickens as the cavity shrinks.
    ring_area = np.pi * ((a_ed + wall_ed) * (b_ed + wall_ed) - a_ed * b_ed)
    p = a + b
    wall = (-p + np.sqrt(p**2 + 4 * ring_area / np.pi)) / 2

    # Geometry: apex near the top of the fan, long axis roughly vertical with some tilt.
    centre_y = rng.uniform(0.45, 0.55) * fov_mm
    centre_x = rng.uniform(0.42, 0.58) * fov_mm
    tilt = np.deg2rad(rng.uniform(-20, 20))
    ys, xs = (np.mgrid[0:size, 0:size] + 0.5) * spacing
    dy, dx = ys - centre_y, xs - centre_x
    u = dx * np.cos(tilt) - dy * np.sin(tilt)  # across the ventricle
    v = dx * np.sin(tilt) + dy * np.cos(tilt)  # along it
    # The base (mitral plane) stays put while the apex moves: shift the centre with b.
    v = v[None] + (b - b_ed)[:, None, None]
    u = u[None]
    A, B, W = a[:, None, None], b[:, None, None], wall[:, None, None]
    soft = spacing * 0.6
    rho_in = np.sqrt((u / A) ** 2 + (v / B) ** 2)
    rho_out = np.sqrt((u / (A + W)) ** 2 + (v / (B + W)) ** 2)
    inside = 1 / (1 + np.exp((rho_in - 1) * A / soft))
    within_wall = 1 / (1 + np.exp((rho_out - 1) * (A + W) / soft))
    # Open the base: below the mitral plane the cavity continues into the atrium (dark).
    atrium = 1 / (1 + np.exp(-(v - B * 0.85) / soft)) * (np.abs(u) < A * 0.8)
    echo = TISSUE + (MYOCARDIUM - TISSUE) * within_wall + (BLOOD - MYOCARDIUM) * inside
    echo = np.where(atrium > 0.5, np.minimum(echo, BLOOD + 0.05), echo)
    # Tissue texture that stays with the anatomy from frame to frame.
    texture = 1 + 0.25 * ndimage.gaussian_filter(rng.standard_normal((size, size)), 2.0)
    img = echo * texture[None] * _speckle(rng, (n_frames, size, size), rng.uniform(0.6, 1.1))
    # Fan-shaped field of view from a probe at the top centre, with depth attenuation.
    apex_x, apex_y = fov_mm / 2, -0.05 * fov_mm
    angle = np.arctan2(xs - apex_x, ys - apex_y)
    depth = np.hypot(xs - apex_x, ys - apex_y)
    fan = (np.abs(angle) < np.deg2rad(38)) & (depth < fov_mm * 1.02)
    img = img * np.exp(-depth / (fov_mm * rng.uniform(2.5, 5))) * fan[None]
    img = img * rng.uniform(0.8, 1.25) + 0.02 * rng.standard_normal(img.shape) * fan[None]
    frames = np.clip(img * 200, 0, 255).astype(np.uint8)
    volumes = ellipsoid_volume_ml(a, b)
    edv = float(ellipsoid_volume_ml(a_ed, b_ed))
    esv = float(ellipsoid_volume_ml(a_ed * (1 - s_a), b_ed * (1 - s_b)))
    return CineLoop(
        frames=frames,
        frame_time_s=float(frame_time),
        pixel_spacing_mm=float(spacing),
        ef_percent=100.0 * (edv - esv) / edv,
        volumes_ml=volumes,
        heart_rate_bpm=float(heart_rate),
    )


def make_cine_set(n: int, seed: int, size: int = 64, n_frames: int = 32) -> list[CineLoop]:
    """``n`` loops from one seed (training, validation and test sets use disjoint seeds)."""
    rng = np.random.default_rng(seed)
    return [make_cine(rng, size, n_frames) for _ in range(n)]


def write_us_multiframe(
    loop: CineLoop,
    path: Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "PHANTOM-ECHO",
    patient_name: str = "Phantom^Echo",
    instance_number: int = 1,
) -> Path:
    """Write ``loop`` as an Ultrasound Multi-frame Image Storage instance (explicit VR little endian)."""
    now = _dt.datetime.now()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = US_MULTIFRAME_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = US_MULTIFRAME_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.ImageType = ["ORIGINAL", "PRIMARY", "TTE", "0001"]  # transthoracic echo, 2D (B-mode)
    phantom_header(
        ds,
        modality="US",
        study_description="Echocardiography phantom",
        series_description="Apical long-axis cine",
        body_part="HEART",
        patient_name=patient_name,
        patient_id=patient_id,
        study_uid=study_uid,
        series_uid=series_uid,
        instance_number=instance_number,
    )
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.PatientOrientation = ""
    ds.LossyImageCompression = "00"
    # Cine and Multi-frame modules: frames are equally spaced in time.
    t, rows, cols = loop.frames.shape
    ds.NumberOfFrames = t
    ds.FrameIncrementPointer = (0x0018, 0x1063)
    ds.FrameTime = f"{loop.frame_time_s * 1000:.3f}"
    ds.CineRate = max(1, round(1.0 / loop.frame_time_s))
    ds.HeartRate = round(loop.heart_rate_bpm)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    # Calibration region: how big a pixel is (cm), so measurements have physical units.
    region = Dataset()
    region.RegionSpatialFormat = 1  # 2D
    region.RegionDataType = 1  # tissue
    region.RegionFlags = 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = cols - 1, rows - 1
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
    region.PhysicalDeltaX = region.PhysicalDeltaY = loop.pixel_spacing_mm / 10.0
    ds.SequenceOfUltrasoundRegions = Sequence([region])
    ds.PixelData = np.ascontiguousarray(loop.frames).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
