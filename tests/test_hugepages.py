"""Weights moved into huge-page memory compute exactly as before and stay shared where they were."""
import pytest
import torch

from llm.infer import hugepages
from llm.infer.hugepages import HUGE_PAGE, into_huge_pages
from llm.infer.quantize import for_decoding
from tests.helpers import fresh_seed, tiny_model

needs_thp = pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages on this system")


def mapping_of(address: int) -> str:
    """This process's /proc/self/smaps entry for the mapping that holds an address."""
    entry, inside = [], False
    for line in open("/proc/self/smaps"):
        if "-" in line.split()[0] and all(c in "0123456789abcdef-" for c in line.split()[0]):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if inside:
                break
            inside = start <= address < end
        if inside:
            entry.append(line)
    return "".join(entry)


@needs_thp
@pytest.mark.parametrize("quantize,backend", [(None, None), (None, "inductor"), ("int8", None), ("int4", None)])
def test_moved_model_computes_the_same_and_keeps_ties(quantize, backend):
    seed = fresh_seed()
    model = tiny_model(seed, dtype=torch.float32, tie_embeddings=True, d_model=64)
    tokens = torch.randint(0, 97, (2, 11))
    before = for_decoding(model, quantize, backend, batch_size=1)  # moves the weights; moving again changes nothing
    expected = before(tokens)
    assert into_huge_pages(before) > 0
    assert torch.equal(before(tokens), expected)
    addresses = [t.data_ptr() for t in before.state_dict().values()]
    assert len({mapping_of(a).splitlines()[0] for a in addresses}) == 1  # one mapping holds them all
    assert all(a % hugepages.ALIGNMENT == 0 for a in addresses)
    if backend == "inductor":  # the streamed head reads the embedding's very matrix, still one tensor
        assert before.output.weight.data_ptr() == before.tok_embeddings.weight.data_ptr()


@needs_thp
def test_mapping_asks_for_huge_pages():
    memory = hugepages.huge_page_bytes(2 * HUGE_PAGE)
    assert memory.data_ptr() % HUGE_PAGE == 0 and memory.numel() == 2 * HUGE_PAGE
    memory.fill_(1)
    entry = mapping_of(memory.data_ptr())
    assert "hg" in entry.split("VmFlags:")[1]  # madvise(MADV_HUGEPAGE) is on the mapping
    assert memory.sum().item() == 2 * HUGE_PAGE


def test_nothing_moves_without_huge_pages(monkeypatch):
    monkeypatch.setattr(hugepages, "available", lambda: False)
    model = tiny_model(0, dtype=torch.float32)
    pointers = [t.data_ptr() for t in model.state_dict().values()]
    assert into_huge_pages(model) == 0
    assert [t.data_ptr() for t in model.state_dict().values()] == pointers


@needs_thp
def test_no_memory_for_the_copy_leaves_the_weights_where_they_are(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(hugepages.mmap, "mmap", refuse)
    model = tiny_model(0, dtype=torch.float32)
    pointers = [t.data_ptr() for t in model.state_dict().values()]
    assert into_huge_pages(model) == 0
    assert [t.data_ptr() for t in model.state_dict().values()] == pointers
