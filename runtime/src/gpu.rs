//! The GPU backend: a program's WGSL shaders (`modelc::backend::wgsl`) run
//! through wgpu over one storage buffer that holds the inputs, the weights
//! and the memory plan's arena. A run writes the inputs into the buffer,
//! records every kernel into one command buffer (one submission), and reads
//! back only the outputs. Pipelines and the bind group are made once, at
//! compile time. Machines without a GPU run the same shaders on Mesa's
//! lavapipe (Vulkan on the CPU).

use crate::cpu::Tensor;
use modelc::backend::plan::Plan;
use modelc::backend::wgsl::{self, Layout};
use modelc::ir::graph::{Graph, Op};
use modelc::types::Sizes;
use std::collections::HashMap;
use std::sync::OnceLock;

/// The process's GPU: one adapter and device, made on first use.
pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    /// The adapter, as people know it ("llvmpipe (LLVM 15.0.6, 256 bits)").
    pub name: String,
    /// A GPU, not a software rasteriser on the CPU.
    pub hardware: bool,
    max_binding: u64,
}

static GPU: OnceLock<Result<Gpu, String>> = OnceLock::new();

/// Whether the machine shows a GPU device node (DRM render nodes, NVIDIA's
/// devices), so that `--device auto` does not start Vulkan on machines
/// without one.
pub fn present() -> bool {
    let dri = std::fs::read_dir("/dev/dri")
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("renderD")))
        .unwrap_or(false);
    dri || std::path::Path::new("/dev/nvidia0").exists() || cfg!(not(target_os = "linux"))
}

/// The GPU, or why there is none.
pub fn gpu() -> Result<&'static Gpu, String> {
    GPU.get_or_init(|| pollster::block_on(open())).as_ref().map_err(Clone::clone)
}

async fn open() -> Result<Gpu, String> {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    if std::env::var_os("WGPU_BACKEND").is_none() {
        desc.backends = wgpu::Backends::VULKAN;
    }
    let instance = wgpu::Instance::new(desc);
    let options = wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        force_fallback_adapter: false,
        compatible_surface: None,
        ..Default::default()
    };
    let adapter = instance.request_adapter(&options).await.map_err(|e| {
        format!("no GPU adapter found ({e}); on a machine without a GPU, install Mesa's lavapipe (Debian: mesa-vulkan-drivers)")
    })?;
    let info = adapter.get_info();
    let supported = adapter.limits();
    // Ask for the largest buffers the adapter allows: a program lives in one buffer.
    let limits = wgpu::Limits {
        max_storage_buffer_binding_size: supported.max_storage_buffer_binding_size,
        max_buffer_size: supported.max_buffer_size,
        ..wgpu::Limits::downlevel_defaults()
    };
    let desc = wgpu::DeviceDescriptor {
        label: Some("modelc"),
        required_features: wgpu::Features::empty(),
        required_limits: limits.clone(),
        experimental_features: wgpu::ExperimentalFeatures::disabled(),
        memory_hints: wgpu::MemoryHints::Performance,
        trace: wgpu::Trace::Off,
    };
    let (device, queue) =
        adapter.request_device(&desc).await.map_err(|e| format!("cannot open the GPU {}: {e}", info.name))?;
    let max_binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
    let hardware = info.device_type != wgpu::DeviceType::Cpu;
    Ok(Gpu { device, queue, name: format!("{} ({:?})", info.name, info.backend), hardware, max_binding })
}

/// A graph compiled for the GPU, for given sizes.
pub struct GpuProgram {
    graph: Graph,
    sizes: Sizes,
    plan: Plan,
    layout: Layout,
    buffer: wgpu::Buffer,
    bind_group: wgpu::BindGroup,
    pipelines: Vec<(wgpu::ComputePipeline, [u32; 3])>,
    /// Receives the outputs of a run, to be mapped and read.
    staging: wgpu::Buffer,
    /// Inputs that stay on the GPU once uploaded (weights while decoding).
    resident: std::sync::Mutex<(Vec<String>, Vec<String>)>,
    running: std::sync::Mutex<()>,
    pub compile_seconds: f64,
}

impl GpuProgram {
    pub fn compile(graph: &Graph, sizes: &Sizes) -> Result<GpuProgram, String> {
        let started = std::time::Instant::now();
        let gpu = gpu()?;
        let (graph, sched, plan, layout) = wgsl::prepare(graph, sizes)?;
        let bytes = (layout.len.max(1) * 4) as u64;
        if bytes > gpu.max_binding {
            return Err(format!(
                "the program needs {bytes} bytes of GPU memory in one buffer; {} allows {}",
                gpu.name, gpu.max_binding
            ));
        }
        let shaders = wgsl::shaders(&graph, &sched, &plan, sizes, &layout)?;
        let device = &gpu.device;
        let buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("modelc memory"),
            size: bytes.next_multiple_of(4),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let bind_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: None,
            entries: &[wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only: false },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            }],
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: None,
            bind_group_layouts: &[Some(&bind_layout)],
            immediate_size: 0,
        });
        let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &bind_layout,
            entries: &[wgpu::BindGroupEntry { binding: 0, resource: buffer.as_entire_binding() }],
        });
        let mut pipelines = Vec::new();
        for shader in shaders.into_iter().flatten() {
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&shader.label),
                source: wgpu::ShaderSource::Wgsl(shader.source.as_str().into()),
            });
            let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&shader.label),
                layout: Some(&pipeline_layout),
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            });
            pipelines.push((pipeline, shader.workgroups));
        }
        let outputs: u64 = graph.outputs.iter().map(|(_, id)| (plan.lens[id.index()] * 4) as u64).sum();
        let staging = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("modelc outputs"),
            size: outputs.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(GpuProgram {
            staging,
            resident: Default::default(),
            running: Default::default(),
            graph,
            sizes: sizes.clone(),
            plan,
            layout,
            buffer,
            bind_group,
            pipelines,
            compile_seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Uploads `names` on the next run only: the caller promises not to change them.
    pub fn keep_resident(&self, names: &[String]) {
        self.resident.lock().unwrap_or_else(|e| e.into_inner()).0 = names.to_vec();
    }

    pub fn peak_bytes(&self) -> usize {
        self.layout.len * 4
    }

    /// Seconds per run of the kernels alone: `feeds` uploaded once, then
    /// `repeats` runs in one submission, nothing read back (for benchmarks).
    pub fn time_kernels(&self, feeds: &HashMap<String, Tensor>, repeats: usize) -> Result<f64, String> {
        let gpu = gpu()?;
        self.run(feeds)?;
        let started = std::time::Instant::now();
        let mut encoder = gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        {
            let mut pass =
                encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
            pass.set_bind_group(0, &self.bind_group, &[]);
            for _ in 0..repeats {
                for (pipeline, [x, y, z]) in &self.pipelines {
                    pass.set_pipeline(pipeline);
                    pass.dispatch_workgroups(*x, *y, *z);
                }
            }
        }
        gpu.queue.submit([encoder.finish()]);
        gpu.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| format!("the GPU failed: {e}"))?;
        Ok(started.elapsed().as_secs_f64() / repeats.max(1) as f64)
    }

    /// Runs the program; `feeds` holds every input and weight by name.
    pub fn run(&self, feeds: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>, String> {
        let gpu = gpu()?;
        // One run at a time: runs share the staging buffer.
        let _running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        crate::cpu::check_feeds(&self.graph, &self.sizes, feeds)?;
        let mut resident = self.resident.lock().unwrap_or_else(|e| e.into_inner());
        for (name, offset, len) in &self.layout.externals {
            if resident.1.contains(name) {
                continue;
            }
            let data = &feeds[name].data;
            if *len > 0 {
                gpu.queue.write_buffer(&self.buffer, (*offset * 4) as u64, bytes_of(&data[..*len]));
            }
            if resident.0.contains(name) {
                resident.1.push(name.clone());
            }
        }
        drop(resident);
        let mut encoder = gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        {
            let mut pass =
                encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
            pass.set_bind_group(0, &self.bind_group, &[]);
            for (pipeline, [x, y, z]) in &self.pipelines {
                pass.set_pipeline(pipeline);
                pass.dispatch_workgroups(*x, *y, *z);
            }
        }
        // Only the outputs come back: each is copied into one staging buffer.
        let mut spans = Vec::new();
        let mut total = 0u64;
        for (name, id) in &self.graph.outputs {
            let len = self.plan.lens[id.index()];
            spans.push((name.clone(), *id, total, len));
            total += (len * 4) as u64;
        }
        let staging = &self.staging;
        for (_, id, at, len) in &spans {
            if let (Some(offset), true) = (self.layout.offsets[id.index()], *len > 0) {
                encoder.copy_buffer_to_buffer(&self.buffer, (offset * 4) as u64, staging, *at, Some((*len * 4) as u64));
            }
        }
        gpu.queue.submit([encoder.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        gpu.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| format!("the GPU failed: {e}"))?;
        rx.recv().map_err(|e| format!("the GPU failed: {e}"))?.map_err(|e| format!("cannot read GPU memory: {e}"))?;
        let view = staging.slice(..).get_mapped_range().map_err(|e| format!("cannot read GPU memory: {e}"))?;
        let bytes: &[u8] = &view[..total as usize];
        let mut out = HashMap::new();
        let mut problem = None;
        for (name, id, at, len) in spans {
            let shape = self.graph.dims(id).iter().map(|d| modelc::types::eval_dim(d, &self.sizes)).collect();
            let data: Vec<f32> = match (self.layout.offsets[id.index()], &self.graph.node(id).op) {
                (Some(_), _) => bytes[at as usize..at as usize + len * 4]
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                (None, Op::Const(v)) => vec![*v as f32; len],
                (None, _) => {
                    problem = Some(format!("bug: output `{name}` has no memory"));
                    continue;
                }
            };
            match shape {
                Ok(shape) => {
                    out.insert(name, Tensor::new(shape, data));
                }
                Err(e) => problem = Some(e),
            }
        }
        drop(view);
        staging.unmap();
        match problem {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

fn bytes_of(data: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) }
}
