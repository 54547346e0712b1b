//! Batches made one after the other: each batch's MAR steps on this
//! thread, then its VAE decode and PNGs either here too (inline) or on a
//! thread of their own while the next batch's MAR steps run (overlapped,
//! through the model's [`ImageDecoder`]). Batches are handed on in order,
//! and the images are the same either way.

use std::time::Instant;

use ndarray::{Array4, ArrayView4};

use super::record::VaeDecode;
use crate::backend::VaeRunner;
use crate::engine::{
    BatchOutput, DecodeSeconds, Engine, EngineError, ImageDecoder, ImageJob, MarModel, ModelError,
    NoiseSource, SampledBatch,
};
use crate::plan::Plan;

/// A batch to make: its jobs, their plans, the positions in it of the
/// images wanted (the others are made for their neighbours' sake, as in
/// the run's batches, and dropped), and what the caller knows it by.
pub(crate) struct Batch<T> {
    pub jobs: Vec<ImageJob>,
    pub plans: Vec<Plan>,
    pub keep: Vec<usize>,
    pub tag: T,
}

/// The wanted images of a batch, made: their jobs and output (in that
/// order), what `finish` made of them, the batch's tag and its seconds.
pub(crate) struct Made<T, X> {
    pub jobs: Vec<ImageJob>,
    pub output: BatchOutput,
    pub finished: X,
    pub tag: T,
    pub seconds: BatchSeconds,
}

/// Where a batch's time went, as the thread that samples sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct BatchSeconds {
    /// Taking the batch from its iterator (its planning) and its MAR
    /// steps.
    pub sampling: f64,
    /// Of the MAR steps, inside model calls.
    pub sampling_model: f64,
    /// Of the MAR steps, inside the runtime's run calls
    /// ([`Engine::sampling_runtime_seconds`]).
    pub sampling_runtime: f64,
    /// Its VAE call, on whichever thread.
    pub vae: f64,
    /// All of its decode (the VAE call, pixels and `finish`), on whichever
    /// thread.
    pub decoding: f64,
    /// How long the sampling thread waited for the decode: all of it
    /// inline; with overlap, what the next batch's sampling did not hide.
    pub waited: f64,
}

impl BatchSeconds {
    /// The wall time the batch cost: its sampling and the wait for its
    /// decode (the time a run of batches grows by with it).
    pub fn wall(&self) -> f64 {
        self.sampling + self.waited
    }

    /// The share of the decode that was waited for (1 inline, less where
    /// sampling hid it).
    fn unhidden(&self) -> f64 {
        if self.decoding > 0.0 {
            (self.waited / self.decoding).min(1.0)
        } else {
            1.0
        }
    }

    /// Of [`BatchSeconds::wall`], the seconds inside model calls: the MAR
    /// steps' and the VAE call's unhidden share.
    pub fn model(&self) -> f64 {
        self.sampling_model + self.vae * self.unhidden()
    }

    /// Of [`BatchSeconds::wall`], the seconds inside the runtime's run
    /// calls: the MAR steps' and the VAE call's unhidden share (the VAE
    /// counted by its call, which holds its run call).
    pub fn runtime(&self) -> f64 {
        self.sampling_runtime + self.vae * self.unhidden()
    }
}

/// What the receiver of batches runs beside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Receiver {
    /// A batch is handed on while the next one decodes (its files are
    /// written meanwhile).
    BesideNextDecode,
    /// A batch is handed on before the next one's decode starts, so no
    /// decode hides behind the receiver's work (which eval does not time).
    BeforeNextDecode,
}

/// How [`make_batches`] makes its batches: the noise, the decoder to
/// decode with beside sampling (`None`: inline, on the sampling thread),
/// and what the receiver runs beside.
pub(crate) struct Making<'a> {
    pub noise: &'a dyn NoiseSource,
    pub decoder: Option<Box<dyn ImageDecoder>>,
    pub receiver: Receiver,
}

/// Makes `batches` on `engine`, handing each one's wanted images to
/// `on_batch` in order, with what `finish` made of them on the decode's
/// thread. With a decoder, a batch's decode runs on another thread while
/// the next batch samples; else after it, on this thread. An error (a
/// batch's planning, its sampling or decode, which `blame` turns into an
/// `E` naming the batch, or `on_batch`'s) stops the run once the batches
/// before it are handed on, as they would be without overlap.
pub(crate) fn make_batches<M, T, X, E>(
    engine: &mut Engine<M>,
    batches: impl Iterator<Item = Result<Batch<T>, E>>,
    making: Making<'_>,
    finish: impl Fn(&BatchOutput) -> X + Sync,
    blame: impl Fn(&T, EngineError) -> E,
    mut on_batch: impl FnMut(Made<T, X>) -> Result<(), E>,
) -> Result<(), E>
where
    M: MarModel,
    T: Send,
    X: Send,
{
    let Making {
        noise,
        mut decoder,
        receiver,
    } = making;
    let finish = &finish;
    let mut hand_on = |engine: &mut Engine<M>, (made, decode): Decoded<T, X>| {
        engine.count_decode(decode);
        on_batch(made)
    };
    let mut batches = batches;
    std::thread::scope(|scope| {
        let mut pending = None;
        loop {
            let began = Instant::now();
            let Some(batch) = batches.next() else { break };
            let sampled = batch.and_then(|b| {
                let model_before = engine.stats.sampling_model_seconds();
                let runtime_before = engine.sampling_runtime_seconds();
                let sampled = engine
                    .sample(&b.plans, &b.jobs, noise, |_, _| {})
                    .map_err(|e| blame(&b.tag, e))?;
                let seconds = BatchSeconds {
                    sampling: began.elapsed().as_secs_f64(),
                    sampling_model: engine.stats.sampling_model_seconds() - model_before,
                    sampling_runtime: engine.sampling_runtime_seconds() - runtime_before,
                    ..BatchSeconds::default()
                };
                Ok((b, sampled, seconds))
            });
            // The batch before, decoded meanwhile (its failure comes first,
            // as it would inline).
            let before = match pending.take() {
                Some(handle) => {
                    let waiting = Instant::now();
                    let (returned, finished) = join(handle);
                    decoder = Some(returned);
                    Some(waited(finished, waiting).map_err(|(tag, e)| blame(&tag, e))?)
                }
                None => None,
            };
            let (batch, sampled, seconds) = match sampled {
                Ok(sampled) => sampled,
                Err(e) => {
                    if let Some(before) = before {
                        hand_on(engine, before)?;
                    }
                    return Err(e);
                }
            };
            let before = match (receiver, before) {
                (Receiver::BeforeNextDecode, Some(before)) => {
                    hand_on(engine, before)?;
                    None
                }
                (_, before) => before,
            };
            match decoder.take() {
                // This batch decodes while the one before is handed on.
                Some(mut vae) => {
                    let handle = scope.spawn(move || {
                        let finished =
                            decode(batch, sampled, seconds, finish, |l| vae.decode_image(l));
                        (vae, finished)
                    });
                    pending = Some(handle);
                    if let Some(before) = before {
                        hand_on(engine, before)?;
                    }
                }
                None => {
                    let waiting = Instant::now();
                    let model = &mut engine.model;
                    let finished =
                        decode(batch, sampled, seconds, finish, |l| model.decode_image(l));
                    let decoded = waited(finished, waiting).map_err(|(tag, e)| blame(&tag, e))?;
                    hand_on(engine, decoded)?;
                }
            }
        }
        if let Some(handle) = pending {
            let waiting = Instant::now();
            let decoded = waited(join(handle).1, waiting).map_err(|(tag, e)| blame(&tag, e))?;
            hand_on(engine, decoded)?;
        }
        Ok(())
    })
}

/// A decoded batch and its decode's seconds (for [`Engine::count_decode`]),
/// or its tag and why it failed.
type Decoded<T, X> = (Made<T, X>, DecodeSeconds);
type DecodeResult<T, X> = Result<Decoded<T, X>, (T, EngineError)>;

/// A decode thread's decoder and result; its panic goes on in this thread.
fn join<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// `finished`, with the time waited for it since `waiting` in its seconds.
fn waited<T, X>(finished: DecodeResult<T, X>, waiting: Instant) -> DecodeResult<T, X> {
    finished.map(|(mut made, decode)| {
        made.seconds.waited = waiting.elapsed().as_secs_f64();
        (made, decode)
    })
}

/// How a run with `vae` on `model` decodes: [`VaeDecode::Overlap`] where
/// `vae` overlaps on the model's provider and the model can decode beside
/// sampling ([`MarModel::image_decoder`]), else [`VaeDecode::Inline`];
/// `--vae overlap` where the model cannot is refused, saying why.
pub(crate) fn decide<M: MarModel>(model: &M, vae: VaeRunner) -> Result<VaeDecode, String> {
    match (vae, model.image_decoder()) {
        (VaeRunner::Overlap, Err(why)) => {
            Err(format!("--vae overlap: {why}; use --vae inline (or auto)"))
        }
        (_, Ok(_)) if vae.overlaps(&model.execution_provider()) => Ok(VaeDecode::Overlap),
        _ => Ok(VaeDecode::Inline),
    }
}

/// The decoder [`make_batches`] needs for `decode`, as [`decide`]d on
/// `model` (where one that cannot was refused).
pub(crate) fn decoder_for<M: MarModel>(
    model: &M,
    decode: VaeDecode,
) -> Option<Box<dyn ImageDecoder>> {
    match decode {
        VaeDecode::Overlap => model.image_decoder().ok(),
        _ => None,
    }
}

/// A batch's decode with `vae`, its wanted images kept and `finish` run on
/// them; `seconds` has the batch's sampling, and gets its decode.
fn decode<T, X>(
    batch: Batch<T>,
    sampled: SampledBatch,
    seconds: BatchSeconds,
    finish: impl Fn(&BatchOutput) -> X,
    vae: impl FnOnce(ArrayView4<f32>) -> Result<Array4<f32>, ModelError>,
) -> DecodeResult<T, X> {
    let began = Instant::now();
    let (output, decode) = match sampled.decode_with(vae) {
        Ok(decoded) => decoded,
        Err(e) => return Err((batch.tag, e)),
    };
    let (jobs, output) = if batch.keep.len() == batch.jobs.len() {
        (batch.jobs, output)
    } else {
        let jobs = batch.keep.iter().map(|&k| batch.jobs[k]).collect();
        (jobs, output.select(&batch.keep))
    };
    let finished = finish(&output);
    let seconds = BatchSeconds {
        vae: decode.vae,
        decoding: began.elapsed().as_secs_f64(),
        ..seconds
    };
    let made = Made {
        jobs,
        output,
        finished,
        tag: batch.tag,
        seconds,
    };
    Ok((made, decode))
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
    use crate::engine::{GraphStats, ModelInfo, SeededNoise};
    use crate::plan::Planner;
    use crate::run::RunError;
    use crate::run::outputs::encode_batch;
    use crate::schedule::Schedule;

    /// What a [`Watched`] model's decoders saw.
    #[derive(Default)]
    struct Seen {
        backbone_calls: AtomicUsize,
        decodes: AtomicUsize,
        /// Decodes that found the next batch sampling while they waited.
        overlapped: AtomicUsize,
        /// Calls of [`MarModel::graph_stats`], which in the ONNX Runtime
        /// model wait for a running decode (the VAE's session lock).
        graph_stats_calls: AtomicUsize,
        threads: std::sync::Mutex<Vec<ThreadId>>,
    }

    /// Backbone calls of one batch of mar-8 (8 steps, a call each).
    const BATCH_CALLS: usize = 8;

    /// The fake model, its backbone calls counted where its decoders see
    /// them; its decoders fail at decode `fail_at` (from 1), and decode k
    /// of 1 to `wait` holds until batch k + 1's first backbone call (the
    /// next batch sampling), for at most 20 s.
    struct Watched {
        inner: FakeModel,
        seen: Arc<Seen>,
        fail_at: Option<usize>,
        wait: usize,
        /// How long each decode takes at least.
        delay: Duration,
        /// How long each backbone call takes at least.
        backbone_delay: Duration,
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
                let began = Instant::now();
                while began.elapsed() < Duration::from_secs(20) {
                    if seen.backbone_calls.load(Ordering::SeqCst) > k * BATCH_CALLS {
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
            std::thread::sleep(self.backbone_delay);
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

        /// Counted.
        fn graph_stats(&self) -> Vec<GraphStats> {
            self.seen.graph_stats_calls.fetch_add(1, Ordering::SeqCst);
            Vec::new()
        }

        /// Does not wait.
        fn sampling_graph_stats(&self) -> Vec<GraphStats> {
            Vec::new()
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
            backbone_delay: Duration::ZERO,
            provider: "cpu",
            refuse: None,
        })
    }

    /// `count` batches of 2 images of mar-8, image i labelled i % 10.
    fn batches(info: &ModelInfo, count: usize) -> Work {
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
                Ok(Batch {
                    jobs,
                    plans,
                    keep,
                    tag: (),
                })
            })
            .collect()
    }

    /// Batches to make, as a run hands them over.
    type Work = Vec<Result<Batch<()>, RunError>>;

    /// A handed-on batch's image indices and PNGs.
    type Handed = (Vec<u64>, Vec<Vec<u8>>);

    /// [`make_batches`] as a run calls it (PNGs made on the decode's
    /// thread), overlapped or not, the receiver beside the next decode.
    fn make(
        engine: &mut Engine<Watched>,
        work: Work,
        overlap: bool,
        on_batch: impl FnMut(Made<(), Vec<Vec<u8>>>) -> Result<(), RunError>,
    ) -> Result<(), RunError> {
        make_with(engine, work, overlap, Receiver::BesideNextDecode, on_batch)
    }

    /// [`make`] with the receiver as given.
    fn make_with(
        engine: &mut Engine<Watched>,
        work: Work,
        overlap: bool,
        receiver: Receiver,
        on_batch: impl FnMut(Made<(), Vec<Vec<u8>>>) -> Result<(), RunError>,
    ) -> Result<(), RunError> {
        let making = Making {
            noise: &SeededNoise,
            decoder: overlap.then(|| engine.model.image_decoder().unwrap()),
            receiver,
        };
        let pngs = |output: &BatchOutput| encode_batch(output.pixels.view());
        make_batches(
            engine,
            work.into_iter(),
            making,
            pngs,
            |_, e| e.into(),
            on_batch,
        )
    }

    /// Each handed-on batch, and the result.
    fn run(
        engine: &mut Engine<Watched>,
        work: Work,
        overlap: bool,
    ) -> (Vec<Handed>, Result<(), RunError>) {
        let mut made = Vec::new();
        let result = make(engine, work, overlap, |m| {
            assert_eq!(m.finished.len(), m.output.pixels.dim().0);
            made.push((m.jobs.iter().map(|j| j.index).collect(), m.finished));
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
    /// only see it if that batch samples while they decode. Sampling reads
    /// no statistics that may wait for a running decode.
    #[test]
    fn a_batch_decodes_while_the_next_one_samples() {
        let mut e = engine(None, 2);
        let work = batches(e.model.info(), 3);
        let (made, result) = run(&mut e, work, true);
        result.unwrap();
        assert_eq!(made.len(), 3);
        let seen = &e.model.seen;
        assert_eq!(seen.overlapped.load(Ordering::SeqCst), 2);
        assert_eq!(seen.graph_stats_calls.load(Ordering::SeqCst), 0);
    }

    /// A batch is handed on (written) while the next one decodes: the
    /// receiver of batch k waits, at most 20 s, for decode k + 2 to begin.
    #[test]
    fn a_batch_is_handed_on_while_the_next_one_decodes() {
        let mut e = engine(None, 0);
        let seen = e.model.seen.clone();
        let work = batches(e.model.info(), 3);
        let mut beside = Vec::new();
        let result = make(&mut e, work, true, |m| {
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

    /// With the receiver before the next decode (eval, which does not time
    /// it), batch k is handed on before decode k + 1 starts, where beside
    /// it decode k + 1 runs meanwhile; decodes overlap the next batch's
    /// sampling either way.
    #[test]
    fn a_receiver_before_the_next_decode_runs_beside_no_decode() {
        let receive = |receiver| {
            let mut e = engine(None, 2);
            let seen = e.model.seen.clone();
            let work = batches(e.model.info(), 3);
            let mut decodes_at_hand_on = Vec::new();
            let result = make_with(&mut e, work, true, receiver, |_| {
                // A decode begun beside this hand-on shows within 300 ms.
                let handed = decodes_at_hand_on.len() + 1;
                let began = Instant::now();
                while seen.decodes.load(Ordering::SeqCst) <= handed
                    && began.elapsed() < Duration::from_millis(300)
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                decodes_at_hand_on.push(seen.decodes.load(Ordering::SeqCst));
                Ok(())
            });
            result.unwrap();
            assert_eq!(seen.overlapped.load(Ordering::SeqCst), 2, "{receiver:?}");
            decodes_at_hand_on
        };
        assert_eq!(receive(Receiver::BeforeNextDecode), [1, 2, 3]);
        // The other way, the next decode has begun (the last has none).
        assert_eq!(receive(Receiver::BesideNextDecode), [2, 3, 3]);
    }

    /// A batch's seconds: inline, its whole decode is waited for; with
    /// overlap, the next batch's sampling (mar-8: 8 steps, each a backbone
    /// call of at least 10 ms) hides a decode of 30 ms, except the last
    /// one's (mostly waited for), and the VAE call
    /// counts in the runtime's seconds by the share waited for.
    #[test]
    fn a_batch_is_timed_by_its_sampling_and_the_decode_it_waited_for() {
        let seconds = |overlap: bool| {
            let mut e = engine(None, 0);
            e.model.delay = Duration::from_millis(30);
            e.model.backbone_delay = Duration::from_millis(10);
            let work = batches(e.model.info(), 3);
            let mut seconds = Vec::new();
            make(&mut e, work, overlap, |m| {
                seconds.push(m.seconds);
                Ok(())
            })
            .unwrap();
            seconds
        };
        for (overlap, s) in [(false, seconds(false)), (true, seconds(true))] {
            assert_eq!(s.len(), 3);
            for (k, b) in s.iter().enumerate() {
                let context = format!("overlap {overlap}, batch {k}: {b:?}");
                assert!(b.sampling >= 0.08 && b.sampling_model >= 0.08, "{context}");
                assert!(b.sampling_runtime == b.sampling_model, "{context}");
                assert!(b.vae >= 0.03 && b.decoding >= b.vae, "{context}");
                assert_eq!(b.wall(), b.sampling + b.waited, "{context}");
                let hidden = overlap && k < 2;
                if hidden {
                    assert!(b.waited < b.decoding / 2.0, "{context}");
                    assert!(b.runtime() < b.sampling_runtime + b.vae / 2.0, "{context}");
                } else if !overlap {
                    assert!(b.waited >= b.decoding, "{context}");
                    assert_eq!(b.runtime(), b.sampling_runtime + b.vae, "{context}");
                    assert_eq!(b.model(), b.sampling_model + b.vae, "{context}");
                } else {
                    // The last decode: waited for from after its thread
                    // began, most of it.
                    assert!(b.waited > b.decoding / 2.0, "{context}");
                    assert!(b.runtime() > b.sampling_runtime + b.vae / 2.0, "{context}");
                }
            }
        }
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
            let mut handed = 0;
            let result = make(&mut e, work, overlap, |_| {
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
            decide(&e.model, vae)
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
