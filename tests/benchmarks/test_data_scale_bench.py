"""benchmarks/data_scale.py at a tiny size: the store it builds is complete and in the real format, its figures
are consistent, the loader-cores arithmetic is what it says, and report.py renders its tables. No timing
assertions."""
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import data_scale  # noqa: E402
import report_tables  # noqa: E402


def test_tiny_run_and_its_tables(tmp_path):
    r = data_scale.main(["--images", "80", "--convert_images", "12", "--reads", "40", "--samples", "64",
                         "--batches", "2", "--workers", "0,1", "--workdir", str(tmp_path / "w"), "--keep",
                         "--out", str(tmp_path / "data_scale_tiny.json")])
    assert (tmp_path / "w" / "data" / "features" / "meta.json").is_file()      # a complete store
    assert (tmp_path / "w" / "data" / "text" / "meta.json").is_file()          # and its text store
    assert r["build"]["text_store_captions_per_s"] > 0 and r["open"]["dataset_open_without_text_store_s"] > 0
    assert 80 * 10 <= r["regions"] <= 80 * 50 and r["build"]["convert_images"] == 12
    assert r["per_sample"]["region_dtype"] == "float16"                         # as stored, to the device
    assert [w["workers"] for w in r["loader"]] == [0, 1] and r["loader"][1]["main_cpu_ms_per_sample"] is not None
    need = r["need"]
    assert need["samples_per_s"] == round(395e12 / 44e9)
    assert need["loader_cpu_ms_per_sample"] == r["loader"][1]["loader_cpu_ms_per_sample"]
    assert need["cores"] == round(395e12 / 44e9 * need["loader_cpu_ms_per_sample"] / 1e3, 1)
    assert need["true_half_mfu_samples_per_s"] == round(494.5e12 / 44e9)
    assert need["true_half_mfu_cores"] == round(494.5e12 / 44e9 * need["loader_cpu_ms_per_sample"] / 1e3, 1)
    assert need["main_core_share"] == round(395e12 / 44e9 * r["loader"][1]["main_cpu_ms_per_sample"] / 1e3, 2)
    assert r["date"] and r["command"].startswith("python benchmarks/data_scale.py --images 80")
    text = report_tables.tables({"throughput": [], "memory": [], "data_scale": [r]}, [])
    assert "### Data path at 80 images" in text and f"**{need['cores']:.1f} cores**" in text
    assert "`convert_text`" in text and f"{need['true_half_mfu_cores']:.1f} cores" in text
    assert text.count("\n| 0 | ") == 1 and text.count("\n| 1 | ") == 1                  # one row per worker count
