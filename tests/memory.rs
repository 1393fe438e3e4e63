//! The memory estimate a load is checked against (from the safetensors
//! headers, per held format) and releasing a loaded layer's pages.

use candle_core::{DType, Device};
use candle_moe::quant::QuantScheme;
use candle_moe_models::memory::{check_fits, estimate, HoldOptions};
use candle_moe_models::Checkpoint;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Element counts of the expert tensors and of the rest, from the header.
fn counts(dir: &std::path::Path) -> (u64, u64) {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let (mut e, mut o) = (0, 0);
    for (k, v) in h.as_object().unwrap() {
        let Some(shape) = v.get("shape") else {
            continue;
        };
        let c: u64 = shape
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .product();
        if k.contains(".experts.") {
            e += c;
        } else {
            o += c;
        }
    }
    (e, o)
}

#[test]
fn estimate_follows_the_held_format() {
    let dir = root().join("tests/fixtures/qwen3_moe_bf16");
    let ck = Checkpoint::open(&dir).unwrap();
    let (ne, no) = counts(&dir);
    let base = HoldOptions {
        dtype: DType::BF16,
        expert_dtype: None,
        quant: None,
        quant_dense: None,
        ep_size: 1,
        kv_tokens: 100,
    };
    let e = estimate(&ck, &base).unwrap();
    assert_eq!(e.experts, 2 * ne);
    assert_eq!(e.dense, 2 * no);
    let c = &ck.config;
    assert_eq!(
        e.kv_cache,
        (2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2 * 100) as u64
    );
    let f32 = estimate(
        &ck,
        &HoldOptions {
            dtype: DType::F32,
            ..base.clone()
        },
    )
    .unwrap();
    assert_eq!(f32.experts, 4 * ne);
    let fp8 = HoldOptions {
        quant: Some(QuantScheme::on_load("fp8").unwrap()),
        ..base.clone()
    };
    let q = estimate(&ck, &fp8).unwrap();
    assert!(q.experts >= ne && q.experts <= ne + ne / 1000 + 1, "{q:?}");
    let mx = HoldOptions {
        quant: Some(QuantScheme::on_load("mxfp4").unwrap()),
        ..base.clone()
    };
    let m = estimate(&ck, &mx).unwrap();
    assert_eq!(m.experts, ne * 17 / 32);
    // two in-process ranks replicate the dense weights
    let ep2 = estimate(
        &ck,
        &HoldOptions {
            ep_size: 2,
            ..base.clone()
        },
    )
    .unwrap();
    assert_eq!((ep2.dense, ep2.experts), (2 * e.dense, e.experts));
    // too little memory: one line with the options that fit
    let need = e.total();
    let err = check_fits(&ck, &base, need - 1).unwrap_err().to_string();
    assert!(err.contains("--force-load") && err.contains("GB"), "{err}");
    let fits_fp8 = q.total();
    let err = check_fits(&ck, &base, fits_fp8).unwrap_err().to_string();
    assert!(
        err.contains("--quant fp8") && err.contains("--quant mxfp4"),
        "{err}"
    );
    assert_eq!(check_fits(&ck, &base, need).unwrap(), e);
}

#[test]
fn released_pages_read_back_the_same() {
    let dir = root().join("models/tiny-qwen2-moe");
    let ck = Checkpoint::open(&dir).unwrap();
    let vb = ck.var_builder(DType::F32, &Device::Cpu).unwrap();
    let name = "model.layers.0.mlp.experts.3.up_proj.weight";
    let before = vb
        .get_unchecked(name)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    ck.mapped_pages().release("model.layers.0.");
    ck.mapped_pages().release("");
    let after = vb
        .get_unchecked(name)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(before, after);
}
