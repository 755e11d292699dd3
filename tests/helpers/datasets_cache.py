"""Datasets the tests build locally: files in every format `datasets` reads, and a Hub dataset placed in
the (temporary, offline) datasets cache exactly where a first online `load_dataset("owner/name")` leaves
it, so that the offline load finds it without any network."""

import os


def write_dataset(rows: list, path, fmt: str) -> str:
    """rows -> one file (parquet, arrow, csv, json) or a save_to_disk directory ("disk")."""
    import datasets

    ds = datasets.Dataset.from_list(rows)
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if fmt == "parquet":
        ds.to_parquet(path)
    elif fmt == "csv":
        ds.to_csv(path, index=False)
    elif fmt == "json":
        ds.to_json(path)
    elif fmt == "arrow":
        import pyarrow as pa

        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, ds.data.schema) as writer:
            writer.write_table(ds.data.table)
    elif fmt == "disk":
        ds.save_to_disk(path)
    else:
        raise ValueError(fmt)
    return path


def cache_hub_dataset(name: str, rows: list, tmp_path, split: str = "train", config: str = "default") -> None:
    """Build `name` (owner/dataset) into the datasets cache as its first online load would have."""
    import shutil

    import datasets
    from datasets import config as ds_config
    from datasets.packaged_modules.parquet.parquet import Parquet

    src = write_dataset(rows, os.path.join(str(tmp_path), "hub-src", name.replace("/", "--"), f"{split}.parquet"),
                        "parquet")
    builder = Parquet(cache_dir=os.path.join(str(tmp_path), "hub-build"), dataset_name=name.split("/")[-1],
                      config_name=config, data_files={split: [src]}, hash="0" * 16)
    builder.download_and_prepare()
    owner, dataset = name.split("/")
    dst = os.path.join(ds_config.HF_DATASETS_CACHE, f"{owner}___{dataset}", config, "0.0.0", "0" * 16)
    shutil.copytree(builder.cache_dir, dst, dirs_exist_ok=True)
    assert datasets.load_dataset(name, config, split=split).num_rows == len(rows)
