// An Android-style client (OkHttp 3.x, as Debian's libokhttp-java packages it) uploading a photo
// to the gateway over TLS (or h2c), for tests/early_answers.rs and tests/http2.rs. It trusts the
// test CA only, resolves every name to 127.0.0.1, uploads the photo `count` times (one after
// another, or all at once on one HTTP/2 connection), `rounds` times (1 if not given), each round
// on a new connection, and prints one line per call:
//   ANSWER <protocol> <status> <Retry-After or -> <body on one line>
//   FAILED <exception class>: <message>
//
// Usage: java -cp <jars>:<classes> EarlyAnswer URL CA_PEM PHOTO KEY COUNT http2|http1|h2c serial|parallel [ROUNDS]
// (h2c: HTTP/2 with prior knowledge to an http:// URL.)

import java.io.FileInputStream;
import java.io.InputStream;
import java.net.InetAddress;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.security.KeyStore;
import java.security.cert.Certificate;
import java.security.cert.CertificateFactory;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;

import javax.net.ssl.SSLContext;
import javax.net.ssl.TrustManagerFactory;
import javax.net.ssl.X509TrustManager;

import okhttp3.ConnectionPool;
import okhttp3.MediaType;
import okhttp3.MultipartBody;
import okhttp3.OkHttpClient;
import okhttp3.Protocol;
import okhttp3.Request;
import okhttp3.RequestBody;
import okhttp3.Response;

public class EarlyAnswer {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        String caPem = args[1];
        byte[] photo = Files.readAllBytes(Paths.get(args[2]));
        String key = args[3];
        int count = Integer.parseInt(args[4]);
        String protocol = args[5];
        boolean parallel = args[6].equals("parallel");
        int rounds = args.length > 7 ? Integer.parseInt(args[7]) : 1;

        KeyStore trust = KeyStore.getInstance(KeyStore.getDefaultType());
        trust.load(null, null);
        try (InputStream in = new FileInputStream(caPem)) {
            Certificate ca = CertificateFactory.getInstance("X.509").generateCertificate(in);
            trust.setCertificateEntry("test-ca", ca);
        }
        TrustManagerFactory tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init(trust);
        X509TrustManager tm = (X509TrustManager) tmf.getTrustManagers()[0];
        SSLContext ssl = SSLContext.getInstance("TLS");
        ssl.init(null, new javax.net.ssl.TrustManager[] {tm}, null);

        List<Protocol> protocols;
        switch (protocol) {
            case "http2": protocols = java.util.Arrays.asList(Protocol.HTTP_2, Protocol.HTTP_1_1); break;
            case "h2c": protocols = Collections.singletonList(Protocol.H2_PRIOR_KNOWLEDGE); break;
            default: protocols = Collections.singletonList(Protocol.HTTP_1_1);
        }
        OkHttpClient base = new OkHttpClient.Builder()
                .sslSocketFactory(ssl.getSocketFactory(), tm)
                .dns(host -> Collections.singletonList(InetAddress.getByName("127.0.0.1")))
                .protocols(protocols)
                .retryOnConnectionFailure(false)
                .connectTimeout(10, TimeUnit.SECONDS)
                .writeTimeout(20, TimeUnit.SECONDS)
                .readTimeout(20, TimeUnit.SECONDS)
                .build();
        base.dispatcher().setMaxRequestsPerHost(count);

        ExecutorService pool = Executors.newFixedThreadPool(parallel ? count : 1);
        for (int round = 0; round < rounds; round++) {
            // A pool of its own: the round's first upload opens a new connection.
            OkHttpClient client = base.newBuilder().connectionPool(new ConnectionPool()).build();
            List<Future<String>> calls = new ArrayList<>();
            for (int i = 0; i < count; i++) {
                calls.add(pool.submit(() -> call(client, url, key, photo)));
            }
            for (Future<String> f : calls) {
                System.out.println(f.get());
            }
            client.connectionPool().evictAll();
        }
        pool.shutdown();
        base.dispatcher().executorService().shutdown();
    }

    static String call(OkHttpClient client, String url, String key, byte[] photo) {
        RequestBody body = new MultipartBody.Builder()
                .setType(MultipartBody.FORM)
                .addFormDataPart("image", "face.jpg", RequestBody.create(MediaType.get("image/jpeg"), photo))
                .build();
        Request request = new Request.Builder()
                .url(url)
                .header("Authorization", "Bearer " + key)
                .post(body)
                .build();
        try (Response r = client.newCall(request).execute()) {
            String retry = r.header("Retry-After");
            String text = r.body() == null ? "" : r.body().string();
            return "ANSWER " + r.protocol() + " " + r.code() + " " + (retry == null ? "-" : retry) + " "
                    + text.replace('\n', ' ');
        } catch (Exception e) {
            return "FAILED " + e.getClass().getName() + ": " + String.valueOf(e.getMessage()).replace('\n', ' ');
        }
    }
}
