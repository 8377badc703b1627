"""Hub ids: what from_pretrained fetches, from which folder, at which revision, sharded or not.

The hub cannot be reached here, so huggingface_hub.hf_hub_download is replaced by a fake that serves files from
local folders laid out as repositories (one folder per revision) and fails as the real one does: EntryNotFoundError
for a file the repository lacks, LocalEntryNotFoundError for one that is offline and not cached. The real hub is
exercised by the `network` test at the end (excluded by default).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import codec
from codec import CheckpointError


class FakeHub:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[tuple[str, str | None, str | None]] = []
        self.offline_files: set[str] = set()
        self.offline = False

    def repository(self, repo_id: str, revision: str = "main") -> Path:
        path = self.root / repo_id / revision
        path.mkdir(parents=True, exist_ok=True)
        return path

    def download(self, repo_id, filename, *, subfolder=None, revision=None, **kwargs) -> str:
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        self.calls.append((filename, subfolder, revision))
        if filename in self.offline_files:
            raise LocalEntryNotFoundError(f"{filename}: offline and not in the cache")
        path = self.root / repo_id / (revision or "main") / (subfolder or "") / filename
        if not path.is_file() and self.offline:  # offline, huggingface_hub says "not cached" for files it lacks
            raise LocalEntryNotFoundError(f"{filename}: offline and not in the cache")
        if not path.is_file():
            raise EntryNotFoundError(f"{repo_id} has no {subfolder or ''}/{filename}")
        return str(path)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    import huggingface_hub

    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.download)
    monkeypatch.chdir(tmp_path)  # so no local folder named like the repository is found first
    return fake


def test_a_vae_repository_and_a_pipelines_vae_folder(hub, diffusers_vae, assert_same_tensors):
    diffusers_vae.save_pretrained(hub.repository("someone/vae"))
    assert_same_tensors(codec.AutoencoderKL.from_pretrained("someone/vae").state_dict(), diffusers_vae.state_dict())
    diffusers_vae.save_pretrained(hub.repository("someone/pipeline") / "vae")  # no config.json at its root
    loaded = codec.AutoencoderKL.load("someone/pipeline")  # as --model takes it
    assert_same_tensors(loaded.state_dict(), diffusers_vae.state_dict())
    assert ("config.json", "vae", None) in hub.calls
    hub.repository("someone/empty")
    with pytest.raises(CheckpointError, match=r"someone/empty: no config\.json at the root or in vae/"):
        codec.AutoencoderKL.from_pretrained("someone/empty")


def test_sharded_weights_are_fetched_shard_by_shard(hub, diffusers_vae, assert_same_tensors):
    folder = hub.repository("someone/big-vae") / "vae"
    diffusers_vae.save_pretrained(folder, max_shard_size="200KB")
    shards = sorted(path.name for path in folder.glob("*.safetensors"))
    assert len(shards) > 2 and (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = codec.AutoencoderKL.from_pretrained("someone/big-vae", subfolder="vae")
    assert_same_tensors(loaded.state_dict(), diffusers_vae.state_dict())
    assert sorted(name for name, _, _ in hub.calls if name in shards) == shards  # each fetched, once


def test_a_cached_sharded_vae_loads_offline(hub, diffusers_vae, assert_same_tensors):
    # Offline, asking for the single weights file a sharded repository lacks raises LocalEntryNotFoundError (a
    # cache filled by `hf download` does not record what the repository lacks): the index is tried next. A
    # pipeline's VAE, without a config.json at the root, likewise.
    diffusers_vae.save_pretrained(hub.repository("someone/big-vae"), max_shard_size="200KB")
    diffusers_vae.save_pretrained(hub.repository("someone/pipeline") / "vae")
    hub.offline = True
    loaded = codec.AutoencoderKL.from_pretrained("someone/big-vae")
    assert_same_tensors(loaded.state_dict(), diffusers_vae.state_dict())
    assert_same_tensors(codec.AutoencoderKL.load("someone/pipeline").state_dict(), diffusers_vae.state_dict())
    with pytest.raises(CheckpointError, match=r"someone/elsewhere: could not fetch it .*LocalEntryNotFoundError"):
        codec.AutoencoderKL.from_pretrained("someone/elsewhere")  # nothing cached at all: unreachable, not "no config"


def test_a_revision_is_passed_through(hub, diffusers_vae, assert_same_tensors):
    diffusers_vae.save_pretrained(hub.repository("someone/vae"))
    other = codec.AutoencoderKL(codec.AutoencoderKLConfig.from_dict(dict(diffusers_vae.config)))
    other.save_pretrained(hub.repository("someone/vae", revision="v2"))  # freshly initialised: other weights
    at_v2 = codec.AutoencoderKL.from_pretrained("someone/vae", revision="v2")
    assert_same_tensors(at_v2.state_dict(), other.state_dict())
    assert {revision for _, _, revision in hub.calls} == {"v2"}


def test_offline_with_only_the_config_cached_says_what_to_do(hub, diffusers_vae):
    diffusers_vae.save_pretrained(hub.repository("someone/vae"))
    hub.offline_files = {"diffusion_pytorch_model.safetensors"}
    with pytest.raises(CheckpointError, match=r"someone/vae: could not fetch it .*LocalEntryNotFoundError"):
        codec.AutoencoderKL.from_pretrained("someone/vae")  # not "no weights file": the weights exist up there


def test_a_repository_without_weights_names_what_it_expected(hub, diffusers_vae):
    folder = hub.repository("someone/vae")
    diffusers_vae.save_pretrained(folder)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights file in the repository root; expected one of .*\.bin"):
        codec.AutoencoderKL.from_pretrained("someone/vae")


def test_a_shard_index_that_points_outside_its_folder_is_refused(hub, diffusers_vae):
    folder = hub.repository("someone/vae")
    diffusers_vae.save_pretrained(folder, max_shard_size="200KB")
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text('{"weight_map": {"encoder.conv_in.weight": "../../elsewhere.safetensors"}}')
    with pytest.raises(CheckpointError, match="unreadable shard index"):
        codec.AutoencoderKL.from_pretrained("someone/vae")


@pytest.mark.network
def test_the_real_sd_vae_matches_diffusers_on_the_same_weights():
    import diffusers

    ours = codec.AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-mse")
    theirs = diffusers.AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-mse").eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours_mean = ours.encode(x).latent_dist.mean
        assert torch.allclose(ours_mean, theirs.encode(x).latent_dist.mean, atol=1e-4)
        assert torch.allclose(ours.decode(ours_mean).sample, theirs.decode(ours_mean).sample, atol=1e-4)
