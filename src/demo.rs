//! The demo's web page: `examples/web/index.html`, served from an origin of its own (by default
//! `http://127.0.0.1:8082`) so that a browser calls the gateway across origins, as a web app
//! would, through the gateway's CORS.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};

/// The page, carried in the binary: the demo runs outside the repository too.
pub const PAGE: &str = include_str!("../examples/web/index.html");

/// A listener for the page, bound before the demo says it is ready.
pub struct PageServer {
    listener: std::net::TcpListener,
    /// Where `/` sends a browser: the page, told which gateway to call.
    start: Arc<str>,
}

impl PageServer {
    pub fn bind(listen: SocketAddr, gateway_url: &str) -> anyhow::Result<PageServer> {
        let listener = std::net::TcpListener::bind(listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (--web-listen): {e}"))?;
        listener.set_nonblocking(true)?;
        // `scheme://host:port` is already valid in a query (RFC 3986 allows `:` and `/` there).
        let start = format!("/index.html?gateway={gateway_url}");
        Ok(PageServer {
            listener,
            start: start.into(),
        })
    }

    /// The page's origin, as a browser sends it in `Origin`.
    pub fn origin(&self) -> anyhow::Result<String> {
        Ok(format!("http://{}", self.listener.local_addr()?))
    }

    /// Serve until the future is dropped.
    pub async fn run(self) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::from_std(self.listener)?;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let start = self.start.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let start = start.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(&req, &start)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    }
}

fn answer<B>(req: &Request<B>, start: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body, location) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/") => {
            (StatusCode::SEE_OTHER, "text/plain", "", Some(start))
        }
        (&Method::GET | &Method::HEAD, "/index.html") => {
            (StatusCode::OK, "text/html; charset=utf-8", PAGE, None)
        }
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n", None),
    };
    let mut r = Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .header("x-content-type-options", "nosniff");
    if let Some(l) = location {
        r = r.header("location", l);
    }
    r.body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_sends_the_browser_to_the_page_with_its_gateway() {
        let server = PageServer::bind(
            "127.0.0.1:0".parse().expect("addr"),
            "http://127.0.0.1:8080",
        )
        .expect("bind");
        let req = Request::get("/").body(()).expect("request");
        let r = answer(&req, &server.start);
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert_eq!(
            r.headers()["location"],
            "/index.html?gateway=http://127.0.0.1:8080"
        );
        let page = answer(&Request::get("/index.html").body(()).expect("request"), "");
        assert_eq!(page.status(), StatusCode::OK);
        let other = answer(
            &Request::get("/../Cargo.toml").body(()).expect("request"),
            "",
        );
        assert_eq!(other.status(), StatusCode::NOT_FOUND);
        let post = answer(&Request::post("/index.html").body(()).expect("request"), "");
        assert_eq!(post.status(), StatusCode::NOT_FOUND);
    }
}
