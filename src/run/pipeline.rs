//! Batches made one after the other: each batch's MAR steps on this
//! thread, then its VAE decode and PNGs either here too (inline) or on a
//! thread of their own while the next batch's MAR steps run (overlapped,
//! through the model's [`ImageDecoder`]). Batches are handed on in order,
//! and the images are the same either way.

use ndarray::{Array4, ArrayView4};

use super::RunError;
use super::outputs::encode_batch;
use super::record::VaeDecode;
use crate::backend::VaeRunner;
use crate::engine::{
    BatchOutput, DecodeSeconds, Engine, EngineError, ImageDecoder, ImageJob, MarModel, ModelError,
    NoiseSource, SampledBatch,
};
use crate::plan::Plan;

/// A batch to make: its jobs, their plans, and the positions in it of the
/// images wanted (the others are made for their neighbours' sake, as in
/// the run's batches, and dropped).
pub(super) struct Batch {
    pub jobs: Vec<ImageJob>,
    pub plans: Vec<Plan>,
    pub keep: Vec<usize>,
}

/// The wanted images of a batch, made: their jobs, output and PNGs (in
/// that order).
pub(super) struct Made {
    pub jobs: Vec<ImageJob>,
    pub output: BatchOutput,
    pub pngs: Vec<Vec<u8>>,
}

/// Makes `batches` on `engine` with `noise`, handing each one's wanted
/// images to `on_batch` in order. With a `decoder`, a batch's decode and
/// PNGs run on another thread while the next batch samples and the batch
/// before is handed on; else after it, on this thread. An error (a batch's
/// planning, sampling or decode, or `on_batch`'s) stops the run once the
/// batches before it are handed on, as they would be without overlap.
pub(super) fn make_batches<M: MarModel>(
    engine: &mut Engine<M>,
    batches: impl Iterator<Item = Result<Batch, RunError>>,
    noise: &dyn NoiseSource,
    decoder: Option<Box<dyn ImageDecoder>>,
    mut on_batch: impl FnMut(Made) -> Result<(), RunError>,
) -> Result<(), RunError> {
    std::thread::scope(|scope| {
        let mut decoder = decoder;
        let mut pending = None;
        for batch in batches {
            let sampled = batch.and_then(|b| {
                let sampled = engine.sample(&b.plans, &b.jobs, noise, |_, _| {})?;
                Ok((b, sampled))
            });
            // The batch before, decoded meanwhile (its failure comes first,
            // as it would inline).
            let before = match pending.take() {
                Some(handle) => {
                    let (returned, finished) = join(handle);
                    decoder = Some(returned);
                    Some(finished?)
                }
                None => None,
            };
            let (batch, sampled) = match sampled {
                Ok(sampled) => sampled,
                Err(e) => {
                    if let Some(before) = before {
                        hand_on(engine, before, &mut on_batch)?;
                    }
                    return Err(e);
                }
            };
            match decoder.take() {
                // This batch decodes while the one before is written.
                Some(mut vae) => {
                    pending = Some(scope.spawn(move || {
                        let finished = finish(batch, sampled, |l| vae.decode_image(l));
                        (vae, finished)
                    }));
                    if let Some(before) = before {
                        hand_on(engine, before, &mut on_batch)?;
                    }
                }
                None => {
                    let model = &mut engine.model;
                    let finished = finish(batch, sampled, |l| model.decode_image(l));
                    hand_on(engine, finished?, &mut on_batch)?;
                }
            }
        }
        if let Some(handle) = pending {
            hand_on(engine, join(handle).1?, &mut on_batch)?;
        }
        Ok(())
    })
}

/// A decode thread's decoder and result; its panic goes on in this thread.
fn join<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// How a run with `vae` on `model` decodes: [`VaeDecode::Overlap`] where
/// `vae` overlaps on the model's provider and the model can decode beside
/// sampling ([`MarModel::image_decoder`]), else [`VaeDecode::Inline`];
/// `--vae overlap` where the model cannot is refused, saying why.
pub(super) fn decide<M: MarModel>(model: &M, vae: VaeRunner) -> Result<VaeDecode, RunError> {
    match (vae, model.image_decoder()) {
        (VaeRunner::Overlap, Err(why)) => Err(RunError::Conflict(format!(
            "--vae overlap: {why}; use --vae inline (or auto)"
        ))),
        (_, Ok(_)) if vae.overlaps(&model.execution_provider()) => Ok(VaeDecode::Overlap),
        _ => Ok(VaeDecode::Inline),
    }
}

/// A batch's decode with `vae`, its wanted images kept and their PNGs
/// encoded.
fn finish(
    batch: Batch,
    sampled: SampledBatch,
    vae: impl FnOnce(ArrayView4<f32>) -> Result<Array4<f32>, ModelError>,
) -> Result<(Made, DecodeSeconds), EngineError> {
    let (output, seconds) = sampled.decode_with(vae)?;
    let (jobs, output) = if batch.keep.len() == batch.jobs.len() {
        (batch.jobs, output)
    } else {
        let jobs = batch.keep.iter().map(|&k| batch.jobs[k]).collect();
        (jobs, output.select(&batch.keep))
    };
    let pngs = encode_batch(output.pixels.view());
    Ok((Made { jobs, output, pngs }, seconds))
}

/// Counts a finished batch's decode in the engine's statistics and hands
/// its images on.
fn hand_on<M: MarModel>(
    engine: &mut Engine<M>,
    (made, seconds): (Made, DecodeSeconds),
    on_batch: &mut impl FnMut(Made) -> Result<(), RunError>,
) -> Result<(), RunError> {
    engine.count_decode(seconds);
    on_batch(made)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::thread::ThreadId;
    use std::time::{Duration, Instant};

    use ndarray::{Array3, ArrayView1, ArrayView2, ArrayView3};

    use super::*;
    use crate::engine::fake::FakeModel;
    use crate::engine::{ModelInfo, SeededNoise};
    use crate::plan::Planner;
    use crate::schedule::Schedule;

    /// What a [`Watched`] model's decoders saw.
    #[derive(Default)]
    struct Seen {
        backbone_calls: AtomicUsize,
        decodes: AtomicUsize,
        /// Decodes that found the next batch sampling while they waited.
        overlapped: AtomicUsize,
        threads: std::sync::Mutex<Vec<ThreadId>>,
    }

    /// The fake model, its backbone calls counted where its decoders see
    /// them; its decoders fail at decode `fail_at` (from 1), and decodes
    /// 1 to `wait` hold until the model's backbone runs again (the next
    /// batch sampling), for at most 20 s.
    struct Watched {
        inner: FakeModel,
        seen: Arc<Seen>,
        fail_at: Option<usize>,
        wait: usize,
        /// How long each decode takes at least.
        delay: Duration,
        /// [`MarModel::execution_provider`].
        provider: &'static str,
        /// Why it cannot decode beside sampling, if it says so.
        refuse: Option<&'static str>,
    }

    struct WatchedVae {
        inner: Box<dyn ImageDecoder>,
        seen: Arc<Seen>,
        fail_at: Option<usize>,
        wait: usize,
        delay: Duration,
    }

    impl ImageDecoder for WatchedVae {
        fn decode_image(&mut self, latent: ArrayView4<f32>) -> Result<Array4<f32>, ModelError> {
            let seen = &self.seen;
            seen.threads
                .lock()
                .unwrap()
                .push(std::thread::current().id());
            let k = seen.decodes.fetch_add(1, Ordering::SeqCst) + 1;
            if k <= self.wait {
                let calls = seen.backbone_calls.load(Ordering::SeqCst);
                let began = Instant::now();
                while began.elapsed() < Duration::from_secs(20) {
                    if seen.backbone_calls.load(Ordering::SeqCst) > calls {
                        seen.overlapped.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            std::thread::sleep(self.delay);
            if self.fail_at == Some(k) {
                return Err(ModelError::Graph {
                    graph: "vae_decoder",
                    message: format!("decode {k} broke"),
                });
            }
            self.inner.decode_image(latent)
        }
    }

    impl MarModel for Watched {
        fn info(&self) -> &ModelInfo {
            self.inner.info()
        }

        fn backbone(
            &mut self,
            canvas: ArrayView3<f32>,
            known: ArrayView2<i64>,
            labels: ArrayView1<i64>,
        ) -> Result<Array3<f32>, ModelError> {
            self.seen.backbone_calls.fetch_add(1, Ordering::SeqCst);
            self.inner.backbone(canvas, known, labels)
        }

        fn diffusion(
            &mut self,
            x: ArrayView2<f32>,
            t: ArrayView1<i64>,
            z: ArrayView2<f32>,
        ) -> Result<ndarray::Array2<f32>, ModelError> {
            self.inner.diffusion(x, t, z)
        }

        fn decode_image(&mut self, latent: ArrayView4<f32>) -> Result<Array4<f32>, ModelError> {
            self.image_decoder().unwrap().decode_image(latent)
        }

        fn execution_provider(&self) -> String {
            self.provider.into()
        }

        fn image_decoder(&self) -> Result<Box<dyn ImageDecoder>, String> {
            if let Some(why) = self.refuse {
                return Err(why.into());
            }
            Ok(Box::new(WatchedVae {
                inner: self.inner.image_decoder()?,
                seen: self.seen.clone(),
                fail_at: self.fail_at,
                wait: self.wait,
                delay: self.delay,
            }))
        }
    }

    fn engine(fail_at: Option<usize>, wait: usize) -> Engine<Watched> {
        Engine::new(Watched {
            inner: FakeModel::new(),
            seen: Arc::default(),
            fail_at,
            wait,
            delay: Duration::ZERO,
            provider: "cpu",
            refuse: None,
        })
    }

    /// `count` batches of 2 images of mar-8, image i labelled i % 10.
    fn batches(info: &ModelInfo, count: usize) -> Vec<Result<Batch, RunError>> {
        let schedule =
            Schedule::from_file(Path::new("schedules/mar-8.gtr"), &BTreeMap::new()).unwrap();
        let planner = Planner::new(&schedule, info.grid).unwrap();
        let options = info.defaults.plan_options(None, None);
        let labels: Vec<i64> = (0..2 * count as i64).map(|i| i % 10).collect();
        (0..count)
            .map(|b| {
                let (jobs, plans) =
                    ImageJob::batch(&planner, &options, 7, &[2 * b, 2 * b + 1], &labels).unwrap();
                let keep = vec![0, 1];
                Ok(Batch { jobs, plans, keep })
            })
            .collect()
    }

    /// A handed-on batch's image indices and PNGs.
    type Handed = (Vec<u64>, Vec<Vec<u8>>);

    /// Each handed-on batch, and the result.
    fn run(
        engine: &mut Engine<Watched>,
        batches: Vec<Result<Batch, RunError>>,
        overlap: bool,
    ) -> (Vec<Handed>, Result<(), RunError>) {
        let decoder = overlap.then(|| engine.model.image_decoder().unwrap());
        let mut made = Vec::new();
        let result = make_batches(engine, batches.into_iter(), &SeededNoise, decoder, |m| {
            assert_eq!(m.pngs.len(), m.output.pixels.dim().0);
            made.push((m.jobs.iter().map(|j| j.index).collect(), m.pngs));
            Ok(())
        });
        (made, result)
    }

    /// Three batches, the second making only its second image (as for
    /// `--resume`): the same images and PNGs in the same order either way,
    /// overlapped decodes on another thread, each decode counted once.
    #[test]
    fn overlapped_decodes_hand_on_the_inline_images_in_order_from_another_thread() {
        let delay = Duration::from_millis(40);
        let made = |overlap: bool| {
            let mut e = engine(None, 0);
            e.model.delay = delay;
            let mut work = batches(e.model.info(), 3);
            if let Ok(b) = &mut work[1] {
                b.keep = vec![1];
            }
            let (made, result) = run(&mut e, work, overlap);
            result.unwrap();
            (made, e)
        };
        let (inline_made, inline) = made(false);
        let (overlapped_made, overlapped) = made(true);
        let order: Vec<Vec<u64>> = inline_made.iter().map(|m| m.0.clone()).collect();
        assert_eq!(order, [vec![0, 1], vec![3], vec![4, 5]]);
        assert_eq!(inline_made, overlapped_made);
        let here = std::thread::current().id();
        let threads = |e: &Engine<Watched>| e.model.seen.threads.lock().unwrap().clone();
        assert_eq!(threads(&inline), [here; 3]);
        let elsewhere = threads(&overlapped);
        assert_eq!(elsewhere.len(), 3);
        assert!(elsewhere.iter().all(|&t| t != here), "{elsewhere:?}");
        // Three decodes of at least 40 ms each, counted once: under 6.
        for e in [&inline, &overlapped] {
            let vae = e.stats.vae_seconds;
            assert!((0.12..0.24).contains(&vae), "{vae}");
        }
    }

    /// The first two decodes wait for the next batch's backbone: they can
    /// only see it if that batch samples while they decode.
    #[test]
    fn a_batch_decodes_while_the_next_one_samples() {
        let mut e = engine(None, 2);
        let work = batches(e.model.info(), 3);
        let (made, result) = run(&mut e, work, true);
        result.unwrap();
        assert_eq!(made.len(), 3);
        assert_eq!(e.model.seen.overlapped.load(Ordering::SeqCst), 2);
    }

    /// A batch is handed on (written) while the next one decodes: the
    /// receiver of batch k waits, at most 20 s, for decode k + 2 to begin.
    #[test]
    fn a_batch_is_handed_on_while_the_next_one_decodes() {
        let mut e = engine(None, 0);
        let seen = e.model.seen.clone();
        let work = batches(e.model.info(), 3);
        let decoder = e.model.image_decoder().ok();
        let mut beside = Vec::new();
        let result = make_batches(&mut e, work.into_iter(), &SeededNoise, decoder, |m| {
            let next = m.jobs[0].index as usize / 2 + 2;
            let began = Instant::now();
            // The last batch (decode 4 does not exist) has no next one.
            while next <= 3
                && seen.decodes.load(Ordering::SeqCst) < next
                && began.elapsed() < Duration::from_secs(20)
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            beside.push(seen.decodes.load(Ordering::SeqCst) >= next);
            Ok(())
        });
        result.unwrap();
        assert_eq!(beside, [true, true, false]);
    }

    /// A failure stops the run after the batches before it are handed on,
    /// as without overlap; the failure is the one returned.
    #[test]
    fn failures_come_after_the_batches_before_them() {
        for overlap in [false, true] {
            // The second batch's decode fails.
            let mut e = engine(Some(2), 0);
            let work = batches(e.model.info(), 3);
            let (made, result) = run(&mut e, work, overlap);
            assert_eq!(made.len(), 1, "overlap {overlap}");
            let err = result.unwrap_err();
            assert!(
                matches!(err, RunError::Engine(EngineError::Vae(_))),
                "{err:?}"
            );
            // The third batch cannot be planned.
            let mut e = engine(None, 0);
            let mut work = batches(e.model.info(), 3);
            work[2] = Err(RunError::Invalid("batch 3 unplanned".into()));
            let (made, result) = run(&mut e, work, overlap);
            assert_eq!(made.len(), 2, "overlap {overlap}");
            assert!(
                result
                    .unwrap_err()
                    .to_string()
                    .contains("batch 3 unplanned")
            );
            // The receiver stops the run at the first batch.
            let mut e = engine(None, 0);
            let work = batches(e.model.info(), 3);
            let decoder = overlap.then(|| e.model.image_decoder().unwrap());
            let mut handed = 0;
            let result = make_batches(&mut e, work.into_iter(), &SeededNoise, decoder, |_| {
                handed += 1;
                Err(RunError::Invalid("stop".into()))
            });
            assert_eq!(handed, 1);
            assert!(result.unwrap_err().to_string().contains("stop"));
        }
    }

    /// `auto` overlaps on a GPU provider where the model can decode beside
    /// sampling; `overlap` where it cannot is refused, naming why.
    #[test]
    fn the_choice_follows_the_provider_and_what_the_model_allows() {
        let decided = |provider, refuse, vae| {
            let mut e = engine(None, 0);
            e.model.provider = provider;
            e.model.refuse = refuse;
            decide(&e.model, vae).map_err(|e| e.to_string())
        };
        assert_eq!(decided("cpu", None, VaeRunner::Auto), Ok(VaeDecode::Inline));
        assert_eq!(
            decided("cuda", None, VaeRunner::Auto),
            Ok(VaeDecode::Overlap)
        );
        assert_eq!(
            decided("cuda", None, VaeRunner::Inline),
            Ok(VaeDecode::Inline)
        );
        assert_eq!(
            decided("cpu", None, VaeRunner::Overlap),
            Ok(VaeDecode::Overlap)
        );
        let graphs = Some("it captures CUDA graphs");
        assert_eq!(
            decided("cuda", graphs, VaeRunner::Auto),
            Ok(VaeDecode::Inline)
        );
        let refused = decided("cuda", graphs, VaeRunner::Overlap).unwrap_err();
        assert!(
            refused.contains("--vae overlap: it captures CUDA graphs"),
            "{refused}"
        );
    }
}
