//! A Prometheus `/metrics` page read over plain HTTP, and sums of its
//! samples: how the benchmarks see what a server exports (as a scrape
//! would, from outside the process).

use anyhow::{Context, Result};

/// The page at `url` (`http://host:port/path`), headers included.
pub async fn page(url: &str) -> Result<String> {
    let rest = url.strip_prefix("http://").context("a metrics URL must be http://")?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}

/// The samples of metric `name` (exactly: `name` then labels or a space)
/// whose labels contain `label`.
fn samples<'a>(page: &'a str, name: &'a str, label: &'a str) -> impl Iterator<Item = f64> + 'a {
    page.lines()
        .filter(move |l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                && l.contains(label)
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
}

/// Sum of metric `name`'s samples whose labels contain `label`.
pub fn sum(page: &str, name: &str, label: &str) -> f64 {
    samples(page, name, label).sum()
}

/// How many series metric `name` has.
pub fn series(page: &str, name: &str) -> usize {
    samples(page, name, "").count()
}

#[cfg(test)]
mod tests {
    /// Sums match the metric's own lines only (not a longer name's), by
    /// label.
    #[test]
    fn sums_read_the_named_samples() {
        let page = "# TYPE x_sum gauge\nx_sum{engine=\"a\"} 1.5\nx_sum{engine=\"b\"} 2\nx_sum_more 7\nx_count{engine=\"a\"} 3\n";
        assert_eq!(super::sum(page, "x_sum", ""), 3.5);
        assert_eq!(super::sum(page, "x_sum", "engine=\"b\""), 2.0);
        assert_eq!(super::series(page, "x_count"), 1);
    }
}
