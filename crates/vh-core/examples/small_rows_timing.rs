use tch::{Kind, Tensor};
fn main() {
    tch::set_num_threads(2);
    let shapes = [
        (576, 576),
        (192, 576),
        (192, 576),
        (576, 576),
        (1536, 576),
        (1536, 576),
        (576, 1536),
    ];
    let ws: Vec<Tensor> = (0..30)
        .flat_map(|_| {
            shapes
                .iter()
                .map(|&(o, i)| Tensor::randn([o, i], (Kind::Float, tch::Device::Cpu)))
        })
        .collect();
    let head = Tensor::randn([49152, 576], (Kind::Float, tch::Device::Cpu));
    let _g = tch::no_grad_guard();
    for rows in [1i64, 4, 8] {
        let x576 = Tensor::randn([rows, 576], (Kind::Float, tch::Device::Cpu));
        let x1536 = Tensor::randn([rows, 1536], (Kind::Float, tch::Device::Cpu));
        for small in [true, false] {
            vh_core::tensor::set_small_rows_linear(small);
            let run = || {
                for w in &ws {
                    let x = if w.size()[1] == 576 { &x576 } else { &x1536 };
                    let _ = vh_core::tensor::graph_free_linear(x, w, None).unwrap().unwrap();
                }
            };
            run();
            let t = std::time::Instant::now();
            for _ in 0..10 {
                run();
            }
            let body = t.elapsed().as_secs_f64() * 100.0;
            let t = std::time::Instant::now();
            for _ in 0..10 {
                let _ = vh_core::tensor::graph_free_linear(&x576, &head, None).unwrap().unwrap();
            }
            let lm = t.elapsed().as_secs_f64() * 100.0;
            println!("rows {rows} small {small}: 210 body products {body:.1} ms, LM head {lm:.1} ms");
        }
    }
}
