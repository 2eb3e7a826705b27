//! The wasmtime engines, one per WASI generation: pooling allocator, epoch ticker.

use anyhow::Result;
use std::time::Duration;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the epoch advances: the granularity at which running guests yield.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// An engine for all services of one flavor, with instance slots reserved up front (pooling
/// allocator) so that a fresh instance per request costs a few microseconds.
/// `max_memory` is the largest memory limit of any service: the per-store limiter enforces each
/// service's own.
pub(super) fn engine(max_instances: u32, max_memory: u64, concurrent: bool) -> Result<Engine> {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(max_instances)
        // A Rust component is a handful of core modules; only the main one has a memory.
        .total_core_instances(max_instances * 8)
        .total_memories(max_instances)
        .total_tables(max_instances * 8)
        // A WASI 0.3 instance may hold a second fiber stack while one of its tasks is blocked.
        .total_stacks(max_instances * if concurrent { 2 } else { 1 })
        .max_memory_size(usize::try_from(max_memory)?)
        // Reset a returned slot's first pages with memset instead of giving them back to the
        // kernel: unmapping makes every instance page-fault its memory in again and costs TLB
        // shootdowns across cores.
        .linear_memory_keep_resident(512 << 10)
        .table_keep_resident(64 << 10)
        .async_stack_keep_resident(256 << 10)
        // A freed slot stays warm for the component that used it (its memory image stays
        // mapped): with none kept warm, every instance past the busiest few remapped its image,
        // and the mmap's TLB shootdowns across cores halved fresh-instance throughput at 1000
        // connections (BENCHMARKS.md), while RSS after that load was the same within 5 %.
        .max_unused_warm_slots(max_instances)
        // Where the kernel has PAGEMAP_SCAN (Linux 6.7+), reset only the pages an instance
        // dirtied instead of memsetting (and copying the data image over) all of the resident
        // part: a third of a fresh instance's cost in perf.
        .pagemap_scan(wasmtime::Enabled::Auto);
    let mut config = Config::new();
    config
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .epoch_interruption(true)
        .concurrency_support(concurrent)
        .wasm_component_model_async(concurrent);
    let engine = Engine::new(&config)?;
    // One ticker per engine, never per request.
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("epoch-ticker".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })?;
    Ok(engine)
}
