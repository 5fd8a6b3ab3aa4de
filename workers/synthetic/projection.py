"""Projection radiographs (DX/CR-like) of the CT phantoms, with or without a lung nodule.

A frontal (PA) radiograph is the X-ray transmission through the patient: the CT phantom's HU are
turned into linear attenuation ``mu = mu_water * (1 + HU / 1000)`` and summed along the
antero-posterior axis; the detector sees ``I0 * exp(-p)`` photons per pixel with Poisson noise, some
scatter (a broad blur of the primary beam) and a little detector blur, and the image shows
``-log(I / I0)`` so dense structures are bright (MONOCHROME2).

A nodule is a sphere of soft tissue placed where the lung is thick enough to hold it. Projection is
linear in ``mu``, so its contribution is added exactly, in closed form: the chord length of the
sphere along each ray times the attenuation difference from the lung it displaces. One CT phantom
therefore gives many radiographs (with and without nodules, different doses) cheaply.
``write_dx`` stores an image as Digital X-Ray Image Storage - For Presentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from workers.synthetic import phantoms
from workers.synthetic.phantoms import phantom_header

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
MU_WATER_PER_MM = 0.0195  # linear attenuation of water near 70 keV
LUNG_HU, NODULE_HU = -850.0, 30.0


@dataclass
class Radiograph:
    """One projection image with its ground truth."""

    pixels: np.ndarray  # (rows, cols) float32, line integral -log(I/I0) (dimensionless)
    pixel_spacing_mm: float  # isotropic, at the detector
    nodule: bool
    nodules: list[dict] = field(default_factory=list)  # row, col (pixels), diameter_mm, overlap
    photons: float = 0.0  # incident photons per pixel (the dose), kept for error analysis


def attenuation_paths(hu: np.ndarray, spacing_kji: tuple[float, float, float], pixel_mm: float) -> np.ndarray:
    """Line integrals of ``mu`` along j (antero-posterior) for an axial HU volume (k, j, i).

    Returns (rows, cols) on an isotropic ``pixel_mm`` grid with the head at the top (k is assumed to
    run inferior to superior, as in a LPS-ordered axial stack).
    """
    mu = MU_WATER_PER_MM * (1.0 + np.asarray(hu, dtype=np.float32) / 1000.0)
    np.clip(mu, 0, None, out=mu)
    p = mu.sum(axis=1) * spacing_kji[1]  # (k, i)
    p = ndimage.zoom(p, (spacing_kji[0] / pixel_mm, spacing_kji[2] / pixel_mm), order=1)
    return p[::-1].copy()  # superior at row 0


def lung_thickness(lung_mask: np.ndarray, spacing_kji: tuple[float, float, float], pixel_mm: float) -> np.ndarray:
    """Antero-posterior lung thickness (mm) per radiograph pixel, on the same grid as ``attenuation_paths``."""
    t = lung_mask.sum(axis=1).astype(np.float32) * spacing_kji[1]
    t = ndimage.zoom(t, (spacing_kji[0] / pixel_mm, spacing_kji[2] / pixel_mm), order=1)
    return t[::-1].copy()


def add_nodule(
    paths: np.ndarray,
    row: float,
    col: float,
    diameter_mm: float,
    pixel_mm: float,
    nodule_hu: float = NODULE_HU,
    background_hu: float = LUNG_HU,
) -> np.ndarray:
    """Add a spherical nodule's exact projection (chord length x attenuation difference)."""
    r = diameter_mm / 2
    yy, xx = np.mgrid[0 : paths.shape[0], 0 : paths.shape[1]]
    d2 = ((yy - row) * pixel_mm) ** 2 + ((xx - col) * pixel_mm) ** 2
    chord = 2 * np.sqrt(np.clip(r * r - d2, 0, None))
    return paths + chord * MU_WATER_PER_MM * (nodule_hu - background_hu) / 1000.0


def expose(
    paths: np.ndarray, photons: float, rng: np.random.Generator, scatter: float = 0.08, blur_px: float = 0.6
) -> np.ndarray:
    """Detector image ``-log(I / I0)`` with scatter, Poisson noise and detector blur."""
    primary = np.exp(-paths)
    scattered = scatter * ndimage.gaussian_filter(primary, 12.0)
    counts = rng.poisson(np.clip((primary + scattered) * photons, 0, None)).astype(np.float32)
    counts = ndimage.gaussian_filter(counts, blur_px)
    return -np.log(np.clip(counts, 0.5, None) / photons).astype(np.float32)


def place_nodule(thickness_mm: np.ndarray, diameter_mm: float, rng: np.random.Generator) -> tuple[int, int] | None:
    """A random pixel where the lung is thicker than the nodule (so it sits inside lung), or None."""
    rows, cols = np.nonzero(thickness_mm > diameter_mm * 1.5)
    if len(rows) == 0:
        return None
    pick = rng.integers(len(rows))
    return int(rows[pick]), int(cols[pick])


def radiographs_of(
    hu: np.ndarray,
    lung_mask: np.ndarray,
    spacing_kji: tuple[float, float, float],
    n: int,
    rng: np.random.Generator,
    pixel_mm: float = 2.0,
    diameter_range_mm: tuple[float, float] = (8.0, 25.0),
    photons_range: tuple[float, float] = (3e3, 3e4),
) -> list[Radiograph]:
    """``n`` radiographs of one nodule-free CT phantom, about half with one lung nodule.

    ``hu`` and ``lung_mask`` are axial (k, j, i) arrays; nodule size and place, and dose, vary.
    """
    base = attenuation_paths(hu, spacing_kji, pixel_mm)
    thick = lung_thickness(lung_mask, spacing_kji, pixel_mm)
    clear_field = float(np.median(base[thick > 100])) if (thick > 100).any() else float(np.median(base))
    images = []
    for _ in range(n):
        paths, nodules = base, []
        if rng.random() < 0.5:
            diameter = float(rng.uniform(*diameter_range_mm))
            where = place_nodule(thick, diameter, rng)
            if where is not None:
                paths = add_nodule(base, where[0], where[1], diameter, pixel_mm)
                # How much denser the ray through the nodule is than the clear lung field (line
                # integral): high where it projects over the diaphragm dome or the mediastinum.
                overlap = float(base[where] - clear_field)
                nodules.append({"row": where[0], "col": where[1], "diameter_mm": diameter, "overlap": overlap})
        photons = float(np.exp(rng.uniform(np.log(photons_range[0]), np.log(photons_range[1]))))
        images.append(
            Radiograph(
                pixels=expose(paths, photons, rng),
                pixel_spacing_mm=pixel_mm,
                nodule=bool(nodules),
                nodules=nodules,
                photons=photons,
            )
        )
    return images


def projection_source(seed: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A nodule-free CT phantom (``workers.synthetic.phantoms``) rendered axially over the whole trunk for projection.

    Returns HU (k, j, i), the lung mask and the (k, j, i) spacing. Liver lesions may be present
    (they are part of the background a radiograph shows); lung nodules are added in projection.
    """
    rng = np.random.default_rng(seed)
    anatomy = phantoms.make_anatomy(rng, liver_lesions=(0, 2), lung_nodules=(0, 0))
    spacing = (4.0, 4.0, 2.5)  # slices, antero-posterior (summed away), left-right
    grid = phantoms.make_grid((65, 70, 152), spacing, "axial", center_mm=(0.0, 0.0, 0.0))
    ct = phantoms.render(anatomy, grid, rng, noise_hu=0.0, supersample=False)
    return ct.hu, ct.labels == 1, spacing


def to_stored_values(image: np.ndarray) -> np.ndarray:
    """Line integrals -> 12-bit stored values (linear, 0..4095), the way a DX processor would store them."""
    return np.clip(np.round(image / 8.0 * 4095), 0, 4095).astype(np.uint16)


def write_dx(
    radiograph: Radiograph,
    path: Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "PHANTOM-DX",
    patient_name: str = "Phantom^Chest",
    instance_number: int = 1,
) -> Path:
    """Write a radiograph as Digital X-Ray Image Storage - For Presentation (explicit VR little endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    phantom_header(
        ds,
        modality="DX",
        study_description="Chest radiograph phantom",
        series_description="Chest PA",
        body_part="CHEST",
        patient_name=patient_name,
        patient_id=patient_id,
        study_uid=study_uid,
        series_uid=series_uid,
        instance_number=instance_number,
    )
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ViewPosition = "PA"
    ds.ImageLaterality = "U"
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "51185008", "SCT", "Thorax"
    ds.AnatomicRegionSequence = Sequence([region])
    view = Dataset()
    view.CodeValue, view.CodingSchemeDesignator, view.CodeMeaning = "399348003", "SCT", "postero-anterior"
    view.ViewModifierCodeSequence = Sequence()
    ds.ViewCodeSequence = Sequence([view])
    ds.PatientOrientation = ["L", "F"]  # displayed facing the patient: columns run to the left, rows to the feet
    ds.AcquisitionContextSequence = Sequence()
    ds.DetectorType = "SCINTILLATOR"
    ds.ImagerPixelSpacing = [f"{radiograph.pixel_spacing_mm:.4f}"] * 2
    ds.PixelSpacing = ds.ImagerPixelSpacing
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "Phantom geometry, no magnification"
    ds.PositionerType = "COLUMN"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    stored = to_stored_values(radiograph.pixels)
    ds.WindowCenter, ds.WindowWidth = "2048", "4096"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PixelData = stored.tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
