//! The engine's thread: it owns the engine, takes requests and aborts from
//! the HTTP handlers through a channel, runs steps while there is work, and
//! sends each request's outputs back on its own channel. A request whose
//! receiver is gone (the client disconnected) is aborted before the next
//! step, so its blocks go back to the cache.

use candle_moe_models::engine::{EngineStats, StepPlan};
use candle_moe_models::{CausalLm, Engine, EngineConfig, RequestOutput, RequestParams, TextCodec};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// What a request's receiver gets.
#[derive(Debug)]
pub enum Event {
    Output(RequestOutput),
    /// The engine refused the request (names the field).
    Rejected(String),
}

enum Cmd {
    Add {
        id: u64,
        prompt: Vec<u32>,
        params: RequestParams,
        tx: UnboundedSender<Event>,
    },
    Shutdown,
}

/// Engine counters for `/metrics`, with token rates over the last seconds.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub stats: EngineStats,
    pub prompt_tokens_per_s: f64,
    pub generation_tokens_per_s: f64,
}

/// The handlers' side of the worker.
#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<Cmd>,
    next_id: Arc<AtomicU64>,
    metrics: Arc<Mutex<Metrics>>,
}

/// The worker's side: run it with [`Worker::run`] on a thread that can
/// borrow the model.
pub struct Worker {
    rx: Receiver<Cmd>,
    metrics: Arc<Mutex<Metrics>>,
}

/// A connected handle and worker.
pub fn channel() -> (EngineHandle, Worker) {
    let (tx, rx) = std::sync::mpsc::channel();
    let metrics = Arc::new(Mutex::new(Metrics::default()));
    (
        EngineHandle {
            tx,
            next_id: Arc::new(AtomicU64::new(0)),
            metrics: metrics.clone(),
        },
        Worker { rx, metrics },
    )
}

impl EngineHandle {
    /// Queues a request; its outputs arrive on the receiver (dropping it
    /// aborts the request).
    pub fn submit(&self, prompt: Vec<u32>, params: RequestParams) -> UnboundedReceiver<Event> {
        let (tx, rx) = unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cmd = Cmd::Add {
            id,
            prompt,
            params,
            tx,
        };
        if self.tx.send(cmd).is_err() {
            // the worker is gone: the receiver ends at once
            let (tx, rx) = unbounded_channel();
            let _ = tx.send(Event::Rejected("the engine has stopped".into()));
            return rx;
        }
        rx
    }

    /// Asks the worker to finish the running requests and stop.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Cmd::Shutdown);
    }

    pub fn metrics(&self) -> Metrics {
        self.metrics.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

impl Worker {
    /// Runs the engine until [`EngineHandle::shutdown`] (or every handle is
    /// dropped) and no request is left.
    pub fn run(
        self,
        model: &dyn CausalLm,
        codec: Option<Arc<dyn TextCodec>>,
        cfg: EngineConfig,
        followers: Vec<Sender<Arc<StepPlan>>>,
    ) -> candle_moe_models::Result<()> {
        let mut engine = Engine::new(model, codec, cfg)?.with_followers(followers);
        let mut clients: HashMap<u64, UnboundedSender<Event>> = HashMap::new();
        let mut stopping = false;
        let mut window: VecDeque<(Instant, u64, u64)> = VecDeque::new();
        loop {
            // block while idle, then take whatever else arrived
            if !engine.has_work() {
                if stopping {
                    break;
                }
                match self.rx.recv() {
                    Ok(c) => self.handle(c, &mut engine, &mut clients, &mut stopping),
                    Err(_) => break,
                }
            }
            while let Ok(c) = self.rx.try_recv() {
                self.handle(c, &mut engine, &mut clients, &mut stopping);
            }
            clients.retain(|&id, tx| {
                let open = !tx.is_closed();
                if !open {
                    engine.abort(id);
                }
                open
            });
            if engine.has_work() {
                match engine.step() {
                    Ok(outs) => {
                        for o in outs {
                            let done = o.finish.is_some();
                            let id = o.id;
                            let delivered = clients
                                .get(&id)
                                .is_some_and(|tx| tx.send(Event::Output(o)).is_ok());
                            if done || !delivered {
                                clients.remove(&id);
                                if !done {
                                    engine.abort(id);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        // not a request's fault: fail the running ones, go on
                        for (id, tx) in clients.drain() {
                            engine.abort(id);
                            let _ = tx.send(Event::Output(RequestOutput {
                                id,
                                finish: Some(candle_moe_models::FinishReason::Abort),
                                error: Some(e.to_string()),
                                ..Default::default()
                            }));
                        }
                    }
                }
            }
            self.publish(&engine, &mut window);
        }
        Ok(())
    }

    fn handle(
        &self,
        c: Cmd,
        engine: &mut Engine<'_>,
        clients: &mut HashMap<u64, UnboundedSender<Event>>,
        stopping: &mut bool,
    ) {
        match c {
            Cmd::Add {
                id,
                prompt,
                params,
                tx,
            } => {
                if *stopping {
                    let _ = tx.send(Event::Rejected("the server is shutting down".into()));
                    return;
                }
                match engine.add_request(id, prompt, params) {
                    Ok(()) => {
                        clients.insert(id, tx);
                    }
                    Err(e) => {
                        let _ = tx.send(Event::Rejected(e.to_string()));
                    }
                }
            }
            Cmd::Shutdown => *stopping = true,
        }
    }

    /// Updates the shared counters; rates over the last 10 s.
    fn publish(&self, engine: &Engine<'_>, window: &mut VecDeque<(Instant, u64, u64)>) {
        let stats = engine.stats();
        let now = Instant::now();
        window.push_back((now, stats.prompt_tokens, stats.generation_tokens));
        while window
            .front()
            .is_some_and(|w| now.duration_since(w.0) > Duration::from_secs(10))
        {
            window.pop_front();
        }
        let (p, g) = match window.front() {
            Some(&(t, p0, g0)) if now > t => {
                let dt = now.duration_since(t).as_secs_f64();
                (
                    (stats.prompt_tokens - p0) as f64 / dt,
                    (stats.generation_tokens - g0) as f64 / dt,
                )
            }
            _ => (0.0, 0.0),
        };
        if let Ok(mut m) = self.metrics.lock() {
            *m = Metrics {
                stats,
                prompt_tokens_per_s: p,
                generation_tokens_per_s: g,
            };
        }
    }
}
