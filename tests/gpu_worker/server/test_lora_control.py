"""Runtime LoRA loading on a worker's gRPC ``WorkerControl`` service: a load makes the adapter a
model of its own at once (``ListModels``, its fleet record, ``Generate`` by its name), each
refusal has its status (INVALID_ARGUMENT outside ``--lora-root``, ALREADY_EXISTS for a loaded
name, RESOURCE_EXHAUSTED with every slot taken, NOT_FOUND for an unload of an unknown name), an
unload takes the adapter out of the record and the list and frees its slot; the worker's
``llmserve:lora_slots`` / ``llmserve:lora_adapters_loaded`` gauges follow."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from gpu_worker.config import EngineConfig
from gpu_worker.server import ServerConfig, WorkerServer
from llmserve.fleet import MemoryStateStore
from llmserve.v1 import generation_pb2 as pb
from llmserve.v1 import generation_pb2_grpc as pb_grpc
from llmserve.v1 import internal_pb2 as ipb
from llmserve.v1 import internal_pb2_grpc as ipb_grpc
from tests.gpu_worker.server.worker_server_helpers import collect, free_port, greedy
from tests.helpers.lora_adapters import write_random_adapter

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODEL = "base"
IDS = [1, 504, 3458, 282, 4649, 314]


@dataclass(frozen=True)
class Worker:
    target: str
    store: MemoryStateStore
    root: Path
    server: WorkerServer

    def lora_gauges(self) -> tuple[float | None, float | None]:
        """(llmserve:lora_slots, llmserve:lora_adapters_loaded) as a scrape reads them."""
        registry = self.server.engine_metrics.metrics.registry
        return tuple(registry.get_sample_value(f"llmserve:{name}", {"model_name": MODEL})  # type: ignore[return-value]
                     for name in ("lora_slots", "lora_adapters_loaded"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def worker(tiny_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[Worker]:
    model_dir = tiny_model("llama")
    root = tmp_path_factory.mktemp("lora-root")
    for name, seed in (("a", 1), ("b", 2)):
        write_random_adapter(model_dir, root / name, rank=4, seed=seed)
    store = MemoryStateStore()
    port = free_port()
    config = EngineConfig(model=str(model_dir), served_model_name=MODEL, skip_tokenizer_init=True,
                          num_kv_blocks=64, max_num_seqs=4, lora_root=str(root), max_loras=1)
    server = WorkerServer(config, ServerConfig(host="127.0.0.1", port=port, drain_grace_s=0.1,
                                               advertise_address=f"127.0.0.1:{port}"), fleet_store=store)
    await server.start()
    await server.wait_ready()
    yield Worker(server.target, store, root, server)
    await server.drain(0.1)


async def refusal(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value


async def test_load_serve_refuse_and_unload(worker: Worker) -> None:
    async with grpc.aio.insecure_channel(worker.target) as channel:
        control, generation = ipb_grpc.WorkerControlStub(channel), pb_grpc.GenerationStub(channel)
        base = await collect(generation.Generate(pb.GenerateRequest(
            model=MODEL, prompt_token_ids=pb.TokenIds(ids=IDS), sampling=greedy(6))))
        reply = await control.LoadLoraAdapter(ipb.LoadLoraAdapterRequest(lora_name="a",
                                                                          lora_path=str(worker.root / "a")))
        assert list(reply.adapters) == ["a"]
        assert worker.lora_gauges() == (1.0, 1.0)
        models = await generation.ListModels(pb.ListModelsRequest())
        assert {m.name: m.parent for m in models.models} == {MODEL: "", "a": MODEL}
        [record] = (await worker.store.read_fleet()).workers
        assert record.adapters == ("a",)  # published at once
        with_a = await collect(generation.Generate(pb.GenerateRequest(
            model="a", prompt_token_ids=pb.TokenIds(ids=IDS), sampling=greedy(6))))
        assert len(with_a.token_ids[0]) == 6 and with_a.token_ids[0] != base.token_ids[0]

        cases = [
            (ipb.LoadLoraAdapterRequest(lora_name="a", lora_path=str(worker.root / "a")),
             grpc.StatusCode.ALREADY_EXISTS, "already loaded"),
            (ipb.LoadLoraAdapterRequest(lora_name="b", lora_path=str(worker.root / "b")),
             grpc.StatusCode.RESOURCE_EXHAUSTED, "every LoRA slot is taken"),
            (ipb.LoadLoraAdapterRequest(lora_name="c", lora_path=str(worker.root.parent)),
             grpc.StatusCode.INVALID_ARGUMENT, "not under this worker's --lora-root"),
            (ipb.LoadLoraAdapterRequest(lora_name="c"), grpc.StatusCode.INVALID_ARGUMENT, "lora_path"),
        ]
        for request, code, needle in cases:
            err = await refusal(control.LoadLoraAdapter(request))
            assert err.code() == code and needle in (err.details() or ""), err
        err = await refusal(control.UnloadLoraAdapter(ipb.UnloadLoraAdapterRequest(lora_name="zzz")))
        assert err.code() == grpc.StatusCode.NOT_FOUND

        reply = await control.UnloadLoraAdapter(ipb.UnloadLoraAdapterRequest(lora_name="a"))
        assert list(reply.adapters) == []
        assert worker.lora_gauges() == (1.0, 0.0)
        [record] = (await worker.store.read_fleet()).workers
        assert record.adapters == ()
        err = await refusal(collect(generation.Generate(pb.GenerateRequest(
            model="a", prompt_token_ids=pb.TokenIds(ids=IDS), sampling=greedy(6)))))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        reply = await control.LoadLoraAdapter(ipb.LoadLoraAdapterRequest(lora_name="b",
                                                                          lora_path=str(worker.root / "b")))
        assert list(reply.adapters) == ["b"]  # a's slot, free again
