"""pipeline.vectors on real GeoTIFFs written here: the polygon round trip, the minimum mapping unit against GDAL's
sieve and scipy's region labels, areas in UTM and in lon/lat, class selection and names, empty results, bad
input. No Ray."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.features
import shapely
from affine import Affine
from pyproj import CRS, Geod
from scipy import ndimage

from pipeline.cog import write_cog
from pipeline.labels import NODATA
from pipeline.mosaic import class_names_tag
from pipeline.vectors import VectorResult, polygonise, rasterise

NAMES = {0: "background", 1: "water", 2: "built", 3: "crop"}
UTM = 32633
UTM_ORIGIN = (500_000.0, 5_000_000.0)  # on zone 33's central meridian (15 E), ~45 N
PX_M2 = 100.0  # 10 m pixels


def class_map(n: int = 200, seed: int = 0) -> np.ndarray:
    """Blobs of classes 1-3 on background 0, a ring with a hole holding an island, 1-3 px specks, a diagonal
    chain (4-connectivity splits it), a nodata border and nodata hole, and a speck with only nodata around it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    a = np.zeros((n, n), np.uint8)
    a[(yy - 70) ** 2 + (xx - 60) ** 2 < 30**2] = 1
    a[120:170, 30:90] = 2
    ring = (yy - 140) ** 2 + (xx - 140) ** 2
    a[(ring < 35**2) & (ring >= 20**2)] = 3
    a[(ring < 5**2)] = 1  # an island in the ring's hole
    for _ in range(80):  # specks of 1-3 px in any class
        y, x = rng.integers(8, n - 12, 2)
        a[y, x : x + int(rng.integers(1, 4))] = rng.integers(0, 4)
    for i in range(6):  # a diagonal chain: six 1-px regions under 4-connectivity
        a[20 + i, 150 + i] = 2
    a[:5, :] = NODATA  # nodata border (top, right)
    a[:, -8:] = NODATA
    a[90:100, 100:115] = NODATA  # a nodata hole ...
    a[94:96, 106] = 3  # ... with a 2 px speck inside that has no valid neighbour
    a[100, 100:103] = 1  # a speck touching nodata and background
    return a


def write_raster(path, data, *, crs=UTM, transform=None, names=NAMES, nodata=NODATA):
    transform = transform or Affine(10.0, 0.0, UTM_ORIGIN[0], 0.0, -10.0, UTM_ORIGIN[1])
    tags = {"class_names": class_names_tag(names)} if names else None
    return write_cog(path, data, transform=transform, crs=crs, nodata=nodata, tags=tags, overview_resampling="mode")


def sieve_expected(a: np.ndarray, size: int) -> np.ndarray:
    """What the module docstring promises for an MMU of ``size`` px: GDAL's sieve with nodata masked, then every
    4-connected region still under ``size`` px set to nodata (found here with scipy, not with polygons)."""
    out = rasterio.features.sieve(a, size, mask=a != NODATA, connectivity=4)
    for v in np.unique(out[out != NODATA]):
        lab, _ = ndimage.label(out == v)  # default structure: 4-connectivity
        counts = np.bincount(lab.ravel())
        small = counts < size
        small[0] = False
        out[small[lab]] = NODATA
    return out


def small_regions(a: np.ndarray, size: int) -> np.ndarray:
    """Pixels of ``a`` in 4-connected single-class regions under ``size`` px."""
    out = np.zeros(a.shape, bool)
    for v in np.unique(a[a != NODATA]):
        lab, _ = ndimage.label(a == v)
        counts = np.bincount(lab.ravel())
        small = counts < size
        small[0] = False
        out |= small[lab]
    return out


@pytest.fixture(scope="module")
def utm_map(tmp_path_factory):
    d = tmp_path_factory.mktemp("vectors")
    a = class_map()
    return write_raster(d / "classes.tif", a), a


def test_round_trip_is_exact(utm_map, tmp_path):
    path, a = utm_map
    res = polygonise(path, tmp_path / "v.parquet")
    assert isinstance(res, VectorResult) and res.path == tmp_path / "v.parquet" and res.sieved_pixels == 0
    np.testing.assert_array_equal(rasterise(res.path, path), a)

    df = gpd.read_parquet(res.path)
    assert list(df.columns) == ["class_id", "class_name", "area_m2", "geometry"]
    assert df.crs == CRS.from_epsg(UTM) and res.features == len(df)
    assert df["class_id"].dtype == np.uint8 and df["area_m2"].dtype == np.float64
    assert shapely.is_valid(df.geometry.values).all()
    # one row per 4-connected region of each class, nodata excluded
    n_regions = sum(ndimage.label(a == v)[1] for v in np.unique(a[a != NODATA]))
    assert len(df) == n_regions
    assert (df["class_name"] == df["class_id"].map(NAMES)).all()
    # the 6-px diagonal chain of class 2 is six polygons, not one
    chain = df[df.within(shapely.box(*(UTM_ORIGIN[0] + 1500, UTM_ORIGIN[1] - 260),
                                          *(UTM_ORIGIN[0] + 1560, UTM_ORIGIN[1] - 200))) & (df.class_id == 2)]
    assert len(chain) == 6 and np.allclose(chain.area_m2, PX_M2)


def test_areas_in_utm_are_pixel_counts(utm_map, tmp_path):
    path, a = utm_map
    res = polygonise(path, tmp_path / "v.parquet")
    df = gpd.read_parquet(res.path)
    with rasterio.open(path) as src:
        transform = src.transform
    for geom, area in zip(df.geometry, df.area_m2, strict=True):
        px = rasterio.features.rasterize([(geom, 1)], out_shape=a.shape, transform=transform, fill=0).sum()
        assert area == pytest.approx(px * PX_M2, rel=1e-12)
    for v, name in NAMES.items():
        assert res.area_m2_by_class[name] == pytest.approx(np.count_nonzero(a == v) * PX_M2, rel=1e-12)


@pytest.mark.parametrize("mmu_m2, size_px", [(500.0, 5), (450.0, 5), (300.0, 3)])
def test_minimum_mapping_unit_matches_sieve(utm_map, tmp_path, mmu_m2, size_px):
    path, a = utm_map
    res = polygonise(path, tmp_path / "v.parquet", min_mapping_unit_m2=mmu_m2)
    got = rasterise(res.path, path)
    expected = sieve_expected(a, size_px)
    np.testing.assert_array_equal(got, expected)
    assert (expected != a).any()  # the map has specks for the MMU to remove
    changed = got != a
    assert res.sieved_pixels == np.count_nonzero(changed)
    # only pixels of regions under the MMU change, and nodata never becomes a class
    assert not (changed & ~small_regions(a, size_px)).any()
    assert (got[a == NODATA] == NODATA).all()
    # the 2 px speck alone in the nodata hole is left out; the 3 px speck at its edge merged, not left out
    assert (got[94:96, 106] == NODATA).all()
    if size_px > 3:
        assert got[100, 100:103].tolist() == [0, 0, 0]
    df = gpd.read_parquet(res.path)
    assert (df.area_m2 >= mmu_m2).all() and (df.area_m2 >= size_px * PX_M2 - 1e-6).all()


def test_classes_keep_only_those_named_from_the_tag(utm_map, tmp_path):
    path, a = utm_map
    res = polygonise(path, tmp_path / "water.parquet", classes=[1])
    df = gpd.read_parquet(res.path)
    assert set(df.class_id) == {1} and set(df.class_name) == {"water"}
    assert list(res.area_m2_by_class) == ["water"]
    np.testing.assert_array_equal(rasterise(res.path, path), np.where(a == 1, 1, NODATA))

    # with an MMU, the sieve sees every class; sieved_pixels counts only pixels entering or leaving class 1
    res = polygonise(path, tmp_path / "water5.parquet", classes=[1], min_mapping_unit_m2=500.0)
    full = sieve_expected(a, 5)
    got = rasterise(res.path, path)
    np.testing.assert_array_equal(got, np.where(full == 1, 1, NODATA))
    assert res.sieved_pixels == np.count_nonzero((a == 1) != (full == 1))

    # names passed in win over the tag; ids they lack fall back to str(id)
    res = polygonise(path, tmp_path / "named.parquet", class_names={1: "flood"}, classes=[1, 2])
    assert set(gpd.read_parquet(res.path).class_name) == {"flood", "2"}


def test_no_tag_no_nodata_and_other_bands(tmp_path):
    """A plain two-band GeoTIFF without tags or nodata: names are the ids, 255 is still nodata, band picks."""
    a = class_map()
    b = np.where(a == 2, 3, a).astype(np.uint8)
    path = tmp_path / "two.tif"
    with rasterio.open(path, "w", driver="GTiff", width=200, height=200, count=2, dtype="uint8", crs=f"EPSG:{UTM}",
                       transform=Affine(10.0, 0.0, UTM_ORIGIN[0], 0.0, -10.0, UTM_ORIGIN[1])) as dst:
        dst.write(np.stack([a, b]))
    res = polygonise(path, tmp_path / "b1.parquet")
    df = gpd.read_parquet(res.path)
    assert set(df.class_name) == {"0", "1", "2", "3"} and set(df.class_id) == {0, 1, 2, 3}
    np.testing.assert_array_equal(rasterise(res.path, path), a)
    res2 = polygonise(path, tmp_path / "b2.parquet", band=2)
    np.testing.assert_array_equal(rasterise(res2.path, path), b)
    with pytest.raises(ValueError, match="band=3"):
        polygonise(path, tmp_path / "b3.parquet", band=3)


def test_own_nodata_value(tmp_path):
    """A raster whose nodata is 0: 0 is left out, 255 is then an ordinary class."""
    a = class_map()
    a = np.where(a == 0, 7, a).astype(np.uint8)
    a[0, 0:3] = 0
    a[150:155, 150:155] = 255
    path = write_raster(tmp_path / "nd0.tif", a, nodata=0, names=None)
    res = polygonise(path, tmp_path / "v.parquet")
    np.testing.assert_array_equal(rasterise(res.path, path, nodata=0), a)
    assert res.area_m2_by_class["255"] == pytest.approx(np.count_nonzero(a == 255) * PX_M2)
    assert "0" not in res.area_m2_by_class


def test_geographic_areas(tmp_path):
    """EPSG:4326 at 45 N on zone 33's central meridian: areas on the ellipsoid, checked against pyproj's Geod
    and against the same ground in UTM (planar area there is k0² = 0.9992 of the ground area)."""
    n, d = 200, 1e-4  # 200 px of 0.0001 deg: ~1.6 km x 2.2 km
    a = class_map(n, seed=1)
    transform = Affine(d, 0.0, 15.0, 0.0, -d, 45.01)
    path = write_raster(tmp_path / "ll.tif", a, crs=4326, transform=transform)
    res = polygonise(path, tmp_path / "v.parquet")
    df = gpd.read_parquet(res.path)
    assert df.crs == CRS.from_epsg(4326)
    np.testing.assert_array_equal(rasterise(res.path, path), a)

    geod = Geod(ellps="WGS84")
    # edges split at every pixel corner, so Geod's geodesic edges follow the parallels
    dense = shapely.segmentize(df.geometry.values, d)
    geod_area = np.array([abs(geod.geometry_area_perimeter(g)[0]) for g in dense])
    np.testing.assert_allclose(df.area_m2, geod_area, rtol=1e-4)
    utm_area = gpd.GeoSeries(dense, crs=4326).to_crs(UTM).area.to_numpy()
    np.testing.assert_allclose(df.area_m2, utm_area, rtol=5e-3)
    big = df.area_m2.idxmax()
    assert df.area_m2[big] > 1e5 and abs(df.area_m2[big] / utm_area[big] - 1) > 1e-4  # the k0 gap is visible

    # an MMU in m² becomes pixels at the centre row: ~87.6 m² pixels -> 6 px for 500 m²
    res = polygonise(path, tmp_path / "mmu.parquet", min_mapping_unit_m2=500.0)
    np.testing.assert_array_equal(rasterise(res.path, path), sieve_expected(a, 6))
    assert (gpd.read_parquet(res.path).area_m2 >= 500.0).all()


def test_simplify(utm_map, tmp_path):
    path, a = utm_map
    exact = gpd.read_parquet(polygonise(path, tmp_path / "s0.parquet", classes=[1]).path)
    coarse = gpd.read_parquet(polygonise(path, tmp_path / "s20.parquet", classes=[1], simplify_m=20.0).path)
    disk = exact.area_m2.idxmax()
    n0 = shapely.get_num_coordinates(exact.geometry[disk])
    n20 = shapely.get_num_coordinates(coarse.geometry[disk])
    assert n20 < n0 / 2  # the staircase of the disk's edge is gone
    # each vertex moves at most the tolerance: the simplified disk stays within 20 m of the exact one
    assert exact.geometry[disk].hausdorff_distance(coarse.geometry[disk]) <= 20.0 + 1e-6
    assert coarse.area_m2[disk] == pytest.approx(coarse.geometry[disk].area)
    assert shapely.is_valid(coarse.geometry.values).all()
    # a rectangle on pixel edges keeps only its corners at tolerance 0
    rect = np.zeros((20, 20), np.uint8)
    rect[3:9, 2:15] = 1
    rpath = write_raster(tmp_path / "rect.tif", rect)
    df = gpd.read_parquet(polygonise(rpath, tmp_path / "rect.parquet", classes=[1]).path)
    assert len(df) == 1 and shapely.get_num_coordinates(df.geometry[0]) == 5
    assert df.area_m2[0] == pytest.approx(6 * 13 * PX_M2)


def test_empty_result_is_a_valid_file(utm_map, tmp_path):
    path, a = utm_map
    out = tmp_path / "sub" / "empty.parquet"
    res = polygonise(path, out, classes=[9])
    assert res.features == 0 and res.area_m2_by_class == {} and out.exists()
    df = gpd.read_parquet(out)
    assert len(df) == 0 and list(df.columns) == ["class_id", "class_name", "area_m2", "geometry"]
    assert df.crs == CRS.from_epsg(UTM) and df["class_id"].dtype == np.uint8 and df["area_m2"].dtype == np.float64
    assert (rasterise(out, path) == NODATA).all()
    # all-nodata raster, and overwriting an existing file; no temporary file is left behind
    nd = write_raster(tmp_path / "nodata.tif", np.full((30, 30), NODATA, np.uint8))
    assert polygonise(nd, out).features == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["empty.parquet"]


def test_bad_input(tmp_path):
    f = tmp_path / "float.tif"
    write_cog(f, np.zeros((16, 16), np.float32), transform=Affine(10, 0, 0, 0, -10, 0), crs=UTM)
    with pytest.raises(ValueError, match="float.tif.*float32"):
        polygonise(f, tmp_path / "x.parquet")
    ok = write_raster(tmp_path / "ok.tif", np.zeros((16, 16), np.uint8))
    with pytest.raises(ValueError, match="min_mapping_unit_m2"):
        polygonise(ok, tmp_path / "x.parquet", min_mapping_unit_m2=-1.0)
    with pytest.raises(ValueError, match="simplify_m"):
        polygonise(ok, tmp_path / "x.parquet", simplify_m=-0.5)
    with pytest.raises(ValueError, match="simplify_m"):
        polygonise(ok, tmp_path / "x.parquet", simplify_m=float("nan"))
    with pytest.raises(FileNotFoundError):
        polygonise(tmp_path / "missing.tif", tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()
