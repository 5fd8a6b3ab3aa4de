"""CT phantoms: synthetic abdomen/chest volumes with known anatomy and lesions.

The reference models are trained and tested on these, because no patient data or downloaded
weights are available. Anatomy is described analytically in patient coordinates (DICOM LPS, mm)
by ``make_anatomy``; ``render`` samples it on any image grid (any spacing, orientation or slice
order), so ground-truth labels are exact wherever the voxels fall. ``write_ct_series`` writes a
rendered phantom as a DICOM CT Image series with full geometry, so it can be pushed to the node.

Labels (``LABELS``): 0 background (air and unlabelled soft tissue), 1 lung, 2 liver, 3 spleen,
4 kidney, 5 spine, 6 liver lesion, 7 lung nodule.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

LABELS: dict[int, str] = {
    1: "lung",
    2: "liver",
    3: "spleen",
    4: "kidney",
    5: "spine",
    6: "liver_lesion",
    7: "lung_nodule",
}
LESION_LABELS = {"liver_lesion": 6, "lung_nodule": 7}

# Portal-venous phase attenuation (HU) of each tissue.
HU = {
    "air": -1000.0,
    "fat": -100.0,
    "soft_tissue": 45.0,
    "lung": -850.0,
    "liver": 105.0,
    "spleen": 120.0,
    "kidney": 170.0,
    "spine": 450.0,
    "liver_lesion": 35.0,
    "lung_nodule": 25.0,
}

Orientation = Literal["axial", "coronal", "sagittal", "oblique"]


@dataclass(frozen=True)
class Ellipsoid:
    """An axis-aligned ellipsoid (optionally with a cut in z) in patient mm."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]

    def inside(self, xyz: np.ndarray) -> np.ndarray:
        """True for each (N, 3) point inside."""
        d = (xyz - np.asarray(self.center)) / np.asarray(self.radii)
        return (d * d).sum(axis=-1) <= 1.0


@dataclass(frozen=True)
class Lesion:
    """One lesion of a phantom: what it is, where (patient mm) and how large."""

    kind: Literal["liver_lesion", "lung_nodule"]
    center_mm: tuple[float, float, float]
    radii_mm: tuple[float, float, float]

    @property
    def diameter_mm(self) -> float:
        """Equivalent-sphere diameter (mm)."""
        return float(2 * np.prod(self.radii_mm) ** (1 / 3))

    @property
    def label(self) -> int:
        return LESION_LABELS[self.kind]


@dataclass
class Anatomy:
    """One patient's anatomy in patient coordinates; rendered on any grid by ``render``."""

    body: tuple[float, float]  # semi-axes (x, y) of the elliptic body cylinder, mm
    fat_mm: float  # subcutaneous fat thickness
    organs: dict[str, list[Ellipsoid]]  # lung, liver, spleen, kidney
    spine_center: tuple[float, float]  # (x, y) of the vertebral column
    spine_radius: float
    lesions: list[Lesion] = field(default_factory=list)
    z_range: tuple[float, float] = (-130.0, 130.0)  # body extent, mm


@dataclass
class Grid:
    """An image grid: shape (k, j, i) and the 4x4 affine (i, j, k, 1) -> patient LPS mm."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(k, j, i) spacing in mm."""
        cols = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(cols[2]), float(cols[1]), float(cols[0])

    def patient_points(self, offset: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
        """(k, j, i, 3) patient coordinates of voxel centres (plus an offset in voxel units k, j, i)."""
        k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in self.shape), indexing="ij")
        ijk1 = np.stack([i + offset[2], j + offset[1], k + offset[0], np.ones_like(i)], axis=-1)
        return (ijk1 @ self.affine.T)[..., :3]


@dataclass
class CTPhantom:
    """A rendered phantom: HU image, exact labels and the lesions, on one grid."""

    hu: np.ndarray  # (k, j, i) float32
    labels: np.ndarray  # (k, j, i) uint8, see LABELS
    grid: Grid
    anatomy: Anatomy

    @property
    def affine(self) -> np.ndarray:
        return self.grid.affine

    def visible_lesions(self, min_voxels: int = 1) -> list[Lesion]:
        """Lesions whose centre lies in the grid and that cover at least ``min_voxels`` voxels."""
        out = []
        inv = np.linalg.inv(self.affine)
        for lesion in self.anatomy.lesions:
            ijk = (inv @ np.r_[lesion.center_mm, 1.0])[:3]
            kji = np.round(ijk[::-1]).astype(int)
            if np.all(kji >= 0) and np.all(kji < np.asarray(self.hu.shape)):
                if lesion_mask(self, lesion).sum() >= min_voxels:
                    out.append(lesion)
        return out


# --- anatomy ----------------------------------------------------------------------------------


def _jitter(rng: np.random.Generator, value: float, rel: float) -> float:
    return float(value * (1 + rng.uniform(-rel, rel)))


def _point_in(rng: np.random.Generator, shape: Ellipsoid, margin: float) -> np.ndarray:
    """A random point at least ``margin`` (relative) inside an ellipsoid."""
    while True:
        u = rng.uniform(-1, 1, 3)
        if (u * u).sum() <= (1 - margin) ** 2:
            return np.asarray(shape.center) + u * np.asarray(shape.radii)


def make_anatomy(
    rng: np.random.Generator,
    liver_lesions: tuple[int, int] = (0, 3),
    lung_nodules: tuple[int, int] = (0, 3),
    lesion_diameter_mm: tuple[float, float] = (6.0, 32.0),
) -> Anatomy:
    """Random anatomy: organ sizes and places vary by ±15 %, lesions vary in number, size, place."""
    s = lambda v: _jitter(rng, v, 0.15)  # noqa: E731 - a local shorthand
    sh = lambda: rng.uniform(-8, 8)  # noqa: E731
    body = (s(165.0), s(115.0))
    lungs = [
        Ellipsoid((sgn * s(78.0) + sh(), s(5.0) + sh(), s(55.0) + sh()), (s(55.0), s(70.0), s(75.0))) for sgn in (-1, 1)
    ]
    # Patient right is -x in LPS: the liver lies on the right, the spleen on the left.
    liver = Ellipsoid((-s(55.0) + sh(), -s(5.0) + sh(), -s(35.0) + sh()), (s(80.0), s(65.0), s(50.0)))
    spleen = Ellipsoid((s(85.0) + sh(), s(40.0) + sh(), -s(25.0) + sh()), (s(30.0), s(40.0), s(42.0)))
    kidneys = [
        Ellipsoid((sgn * s(62.0) + sh(), s(60.0) + sh(), -s(75.0) + sh()), (s(24.0), s(28.0), s(45.0)))
        for sgn in (-1, 1)
    ]
    organs = {"lung": lungs, "liver": [liver], "spleen": [spleen], "kidney": kidneys}
    lesions: list[Lesion] = []
    for kind, count, hosts in (("liver_lesion", liver_lesions, [liver]), ("lung_nodule", lung_nodules, lungs)):
        for _ in range(int(rng.integers(count[0], count[1] + 1))):
            host = hosts[int(rng.integers(len(hosts)))]
            d = rng.uniform(*lesion_diameter_mm) * (0.75 if kind == "lung_nodule" else 1.0)
            radii = tuple(float(d / 2 * rng.uniform(0.85, 1.15)) for _ in range(3))
            centre = _point_in(rng, host, margin=min(0.8, max(radii) / min(host.radii) + 0.15))
            lesions.append(Lesion(kind, tuple(float(c) for c in centre), radii))
    fat_mm = rng.uniform(8, 20)
    spine_x, spine_y, spine_r = sh() / 2, s(95.0), s(17.0)
    # The spine's centre lies inside the body wall: the jitter alone could push it through,
    # leaving a sliver of "spine" labels with soft-tissue values.
    spine_y = min(spine_y, body[1] - fat_mm - 2.0)
    return Anatomy(
        body=body, fat_mm=fat_mm, organs=organs, spine_center=(spine_x, spine_y), spine_radius=spine_r, lesions=lesions
    )


def _tissue_at(anatomy: Anatomy, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HU (without noise) and label at (N, 3) points; later structures overwrite earlier ones."""
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    hu = np.full(x.shape, HU["air"], dtype=np.float32)
    label = np.zeros(x.shape, dtype=np.uint8)
    a, b = anatomy.body
    in_z = (z >= anatomy.z_range[0]) & (z <= anatomy.z_range[1])
    r_body = (x / a) ** 2 + (y / b) ** 2
    hu[(r_body <= 1) & in_z] = HU["fat"]
    inner = ((x / (a - anatomy.fat_mm)) ** 2 + (y / (b - anatomy.fat_mm)) ** 2 <= 1) & in_z
    hu[inner] = HU["soft_tissue"]

    def paint(mask: np.ndarray, name: str, lab: int) -> None:
        mask = mask & inner
        hu[mask] = HU[name]
        label[mask] = lab

    for lung in anatomy.organs["lung"]:
        paint(lung.inside(xyz), "lung", 1)
    for name, lab in (("liver", 2), ("spleen", 3), ("kidney", 4)):
        for organ in anatomy.organs[name]:
            paint(organ.inside(xyz), name, lab)
    cx, cy = anatomy.spine_center
    paint(((x - cx) ** 2 + (y - cy) ** 2) <= anatomy.spine_radius**2, "spine", 5)
    for lesion in anatomy.lesions:
        paint(Ellipsoid(lesion.center_mm, lesion.radii_mm).inside(xyz), lesion.kind, lesion.label)
    return hu, label


def labels_at(anatomy: Anatomy, grid: Grid) -> np.ndarray:
    """Exact labels (see LABELS) at the voxel centres of any grid: ground truth for a model's own
    working grid, without interpolating the labels of another grid."""
    return _tissue_at(anatomy, grid.patient_points())[1]


# --- grids ------------------------------------------------------------------------------------

_AXES = {  # (row direction, column direction) of IOP for each plane, patient LPS
    "axial": ((1, 0, 0), (0, 1, 0)),
    "coronal": ((1, 0, 0), (0, 0, -1)),
    "sagittal": ((0, 1, 0), (0, 0, -1)),
}


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def make_grid(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    orientation: Orientation = "axial",
    descending: bool = False,
    center_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    rng: np.random.Generator | None = None,
) -> Grid:
    """A grid of ``shape`` (k, j, i) and ``spacing`` (k, j, i) mm centred on ``center_mm``.

    ``descending`` reverses the slice direction (e.g. axial slices running feet to head in
    storage order becomes head to feet). ``oblique`` tilts an axial grid by 10-30 degrees about a
    random axis.
    """
    plane = "axial" if orientation == "oblique" else orientation
    row, col = (np.asarray(v, dtype=float) for v in _AXES[plane])
    if orientation == "oblique":
        rng = rng or np.random.default_rng()
        rot = _rotation(rng.normal(size=3), np.deg2rad(rng.uniform(10, 30)) * rng.choice([-1, 1]))
        row, col = rot @ row, rot @ col
    normal = np.cross(row, col)
    if descending:
        normal = -normal
    affine = np.eye(4)
    affine[:3, 0] = row * spacing[2]
    affine[:3, 1] = col * spacing[1]
    affine[:3, 2] = normal * spacing[0]
    half = (np.asarray(shape[::-1], dtype=float) - 1) / 2  # (i, j, k) centre index
    affine[:3, 3] = np.asarray(center_mm) - affine[:3, :3] @ half
    return Grid(tuple(int(n) for n in shape), affine)


# --- rendering --------------------------------------------------------------------------------


def _sample(anatomy: Anatomy, grid: Grid, supersample: bool) -> tuple[np.ndarray, np.ndarray]:
    """HU (float32, no noise) and labels of the anatomy on the grid."""
    _, labels = _tissue_at(anatomy, grid.patient_points())
    if supersample:
        offsets = [(a, b, c) for a in (-0.25, 0.25) for b in (-0.25, 0.25) for c in (-0.25, 0.25)]
        hu = np.mean([_tissue_at(anatomy, grid.patient_points(o))[0] for o in offsets], axis=0)
    else:
        hu = _tissue_at(anatomy, grid.patient_points())[0]
    return hu.astype(np.float32), labels


def _sample_slab(args: tuple[Anatomy, Grid, bool]) -> tuple[np.ndarray, np.ndarray]:
    return _sample(*args)


def _slabs(grid: Grid, count: int) -> list[Grid]:
    """The grid cut into ``count`` runs of whole slices (k), each with its own origin."""
    bounds = np.linspace(0, grid.shape[0], count + 1).astype(int)
    slabs = []
    for k0, k1 in zip(bounds[:-1], bounds[1:]):
        if k1 > k0:
            affine = grid.affine.copy()
            affine[:3, 3] += affine[:3, 2] * k0
            slabs.append(Grid((int(k1 - k0), grid.shape[1], grid.shape[2]), affine))
    return slabs


def render(
    anatomy: Anatomy,
    grid: Grid,
    rng: np.random.Generator,
    noise_hu: float = 15.0,
    supersample: bool = True,
    processes: int = 1,
) -> CTPhantom:
    """Sample the anatomy on a grid: labels at voxel centres; HU averaged over 8 sub-voxel points
    (partial volume), with smooth correlated noise of ``noise_hu`` standard deviation.

    ``processes`` > 1 samples runs of slices in that many processes (a 300 × 512² phantom takes
    minutes on one core); the phantom is the same up to the rounding of the slices' coordinates."""
    if processes > 1 and grid.shape[0] > 1:
        from concurrent.futures import ProcessPoolExecutor  # noqa: PLC0415 - only big benchmark phantoms

        with ProcessPoolExecutor(processes) as pool:
            parts = list(pool.map(_sample_slab, [(anatomy, slab, supersample) for slab in _slabs(grid, processes)]))
        hu, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    else:
        hu, labels = _sample(anatomy, grid, supersample)
    if noise_hu > 0:
        noise = ndimage.gaussian_filter(rng.normal(size=grid.shape), 0.6)
        hu += (noise / (noise.std() + 1e-6) * noise_hu).astype(np.float32)
    # Scanners store nothing below -1024 HU; clipping here keeps the phantom equal to its DICOM.
    np.maximum(hu, -1024.0, out=hu)
    return CTPhantom(hu=hu, labels=labels, grid=grid, anatomy=anatomy)


def make_ct_phantom(
    seed: int,
    shape: tuple[int, int, int] = (48, 64, 64),
    spacing: tuple[float, float, float] = (5.0, 5.5, 5.5),
    orientation: Orientation = "axial",
    descending: bool = False,
    noise_hu: float = 15.0,
    processes: int = 1,
    **anatomy_args,
) -> CTPhantom:
    """One reproducible phantom (same seed, same phantom) on a grid centred on the abdomen;
    ``processes``: see ``render``."""
    rng = np.random.default_rng(seed)
    anatomy = make_anatomy(rng, **anatomy_args)
    grid = make_grid(shape, spacing, orientation, descending, center_mm=(0.0, 10.0, -10.0), rng=rng)
    return render(anatomy, grid, rng, noise_hu, processes=processes)


def random_ct_phantom(seed: int, max_shape: int = 64) -> CTPhantom:
    """A phantom with random spacing, orientation, slice order and noise (for robustness tests):
    4.5-6.5 mm in-plane, 3-7 mm slices, at most ``max_shape`` voxels along each axis."""
    return _phantom_on_random_grid(seed, (4.5, 6.5), (3.0, 7.0), max_shape)


def clinical_ct_phantom(seed: int) -> CTPhantom:
    """Like ``random_ct_phantom`` on a finer, unclipped grid: 1.5-2.5 mm in-plane over a 360 mm
    field, 2-5 mm slices over 260 mm (up to 240 x 240 x 130 voxels). Still coarser than a
    diagnostic CT (0.6-0.9 mm in-plane), but lesions of 6-15 mm span several voxels, so per-lesion
    scores measure the segmentation rather than the partial volume of one or two voxels."""
    return _phantom_on_random_grid(seed, (1.5, 2.5), (2.0, 5.0), None)


def _phantom_on_random_grid(
    seed: int, in_plane_mm: tuple[float, float], slice_mm: tuple[float, float], max_shape: int | None
) -> CTPhantom:
    rng = np.random.default_rng(seed + 1_000_003)
    orientation = str(rng.choice(["axial", "axial", "coronal", "sagittal", "oblique"]))
    in_plane = float(rng.uniform(*in_plane_mm))
    thick = float(rng.uniform(*slice_mm))
    cap = max_shape or 1 << 30
    n = min(cap, int(360.0 / in_plane))
    shape = (min(cap, int(260 / thick)), n, n)
    return make_ct_phantom(
        seed,
        shape,
        (thick, in_plane, in_plane),
        orientation,  # type: ignore[arg-type]
        descending=bool(rng.integers(2)),
        noise_hu=float(rng.uniform(8, 25)),
    )


def lesion_mask(phantom: CTPhantom, lesion: Lesion) -> np.ndarray:
    """Voxels of one lesion in the phantom's labels (where it is not hidden by another lesion)."""
    inside = Ellipsoid(lesion.center_mm, lesion.radii_mm).inside(phantom.grid.patient_points())
    return inside & (phantom.labels == lesion.label)


# --- DICOM ------------------------------------------------------------------------------------


def phantom_header(
    ds,
    *,
    modality: str,
    study_description: str,
    series_description: str,
    body_part: str,
    patient_name: str,
    patient_id: str,
    study_uid: str | None,
    series_uid: str | None,
    instance_number: int,
) -> None:
    """Patient, study, series and equipment attributes shared by the single-object phantom writers
    (DX, US cine): today's dates, an anonymous sex and birth date, one series numbered 1."""
    now = _dt.datetime.now()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "ainode phantoms"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription, ds.SeriesDescription = study_description, series_description
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "", "O"
    ds.BodyPartExamined = body_part
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number


def write_ct_series(
    phantom: CTPhantom,
    folder: str | Path,
    *,
    patient_id: str = "PHANTOM001",
    patient_name: str = "Phantom^Test",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    instance_order: Literal["slice", "reversed", "shuffled"] = "slice",
    rescale: tuple[float, float] = (1.0, -1024.0),
    transfer_syntax: str | None = None,
    accession_number: str = "ACC0001",
    seed: int = 0,
) -> list[Path]:
    """Write the phantom as a CT Image Storage series (one file per slice) and return the paths.

    Geometry is exact: Image Position (Patient) of each slice is the affine's origin plus k slice
    steps, Image Orientation (Patient) comes from the affine's i/j columns, Pixel Spacing is
    (row step, column step). ``rescale`` is (slope, intercept); stored values are unsigned 16-bit.
    ``instance_order`` sets Instance Numbers, so readers must sort by geometry, not numbers.
    ``transfer_syntax`` compresses with pydicom's encoders (e.g. RLE Lossless, JPEG 2000 Lossless).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    affine = phantom.affine
    spacing_k, spacing_j, spacing_i = phantom.grid.spacing
    row_dir = affine[:3, 0] / spacing_i
    col_dir = affine[:3, 1] / spacing_j
    slope, intercept = rescale
    stored = np.clip(np.round((phantom.hu - intercept) / slope), 0, 65535).astype(np.uint16)
    nk = phantom.hu.shape[0]
    numbers = list(range(1, nk + 1))
    if instance_order == "reversed":
        numbers.reverse()
    elif instance_order == "shuffled":
        np.random.default_rng(seed).shuffle(numbers)
    now = _dt.datetime(2024, 1, 15, 10, 30, 0)
    paths = []
    for k in range(nk):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "19600101", "O"
        ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study_uid, "1", accession_number
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = now.strftime("%H%M%S")
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT ABDOMEN PHANTOM"
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "CT", series_uid, series_number
        ds.SeriesDescription = "Phantom abdomen portal venous"
        ds.BodyPartExamined = "ABDOMEN"
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference_uid, ""
        ds.Manufacturer, ds.ManufacturerModelName = "ainode", "phantom generator"
        ds.InstanceNumber, ds.AcquisitionNumber = numbers[k], 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [_ds_num(v) for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [_ds_num(v) for v in affine[:3, :3] @ np.array([0, 0, k]) + affine[:3, 3]]
        ds.PixelSpacing = [_ds_num(spacing_j), _ds_num(spacing_i)]
        ds.SliceThickness = _ds_num(spacing_k)
        ds.KVP = "120"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = _ds_num(slope), _ds_num(intercept), "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = stored[k].tobytes()
        if transfer_syntax and transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax)
        path = folder / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _ds_num(value: float) -> str:
    """A Decimal String (at most 16 characters) for a float."""
    text = f"{float(value):.10g}"
    if len(text) > 16:
        text = f"{float(value):.8g}"
    return "0" if text == "-0" else text


def phantom_batch(seeds: Iterable[int], **kwargs) -> list[CTPhantom]:
    """Several phantoms (e.g. a held-out set: seeds disjoint from the training seeds)."""
    return [make_ct_phantom(s, **kwargs) for s in seeds]
