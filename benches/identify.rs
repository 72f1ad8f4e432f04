//! What identifying one connection costs (issue 15): `peer::Identifier::identify` on an accepted
//! loopback connection, the whole per-connection work (getsockopt SO_ORIGINAL_DST, the sock_diag
//! exchange, the cgroup path from the cache), and the sock_diag exchange alone.
//! `cargo bench --bench identify` (the end-to-end cost is benches/identify.sh).

use std::hint::black_box;

use credlock::peer::{Identifier, lookup};
use criterion::{Criterion, criterion_group, criterion_main};

fn identify(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (client, accepted) = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (client, accepted)
    });
    let identifier = Identifier::new();
    assert!(
        matches!(
            identifier.identify(&accepted),
            credlock::access::Identity::Identified(_)
        ),
        "this host must let the bench identify its own connection (cgroup v2, sock_diag)"
    );
    let (source, destination) = (client.local_addr().unwrap(), accepted.local_addr().unwrap());
    let mut g = c.benchmark_group("identify");
    g.bench_function("connection", |b| {
        b.iter(|| black_box(identifier.identify(black_box(&accepted))))
    });
    g.bench_function("sock_diag_lookup", |b| {
        b.iter(|| black_box(lookup(source, destination)))
    });
    g.finish();
}

criterion_group!(benches, identify);
criterion_main!(benches);
