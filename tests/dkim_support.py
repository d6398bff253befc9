"""Known answers and helpers for tests/test_dkim.py and bench/dkim_bench.py.

RFC 8032 7.1 Ed25519 test vectors, the RFC 8463 Appendix A example (key, DNS records and
signed message, in tests/data/dkim/rfc8463-a3.eml with CRLF line ends), sample messages,
an in-memory resolver, and dkimpy imported beside dkim.py (both modules are named dkim).
"""

import importlib
import os
import sys

import dnsstub

HERE = os.path.dirname(os.path.abspath(__file__))

# RFC 8032 7.1: (name, secret key, public key, message, signature), all hex.
ED25519_VECTORS = [
    ("TEST 1",
     "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
     "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
     "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("TEST 2",
     "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
     "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
     "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("TEST 3",
     "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
     "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
     "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
    ("TEST 1024",
     "f5e5767cf153319517630f226876b86c8160cc583bc013744c6bf255f5cc0ee5",
     "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e",
     "08b8b2b733424243760fe426a4b54908632110a66c2f6591eabd3345e3e4eb98"
     "fa6e264bf09efe12ee50f8f54e9f77b1e355f6c50544e23fb1433ddf73be84d8"
     "79de7c0046dc4996d9e773f4bc9efe5738829adb26c81b37c93a1b270b20329d"
     "658675fc6ea534e0810a4432826bf58c941efb65d57a338bbd2e26640f89ffbc"
     "1a858efcb8550ee3a5e1998bd177e93a7363c344fe6b199ee5d02e82d522c4fe"
     "ba15452f80288a821a579116ec6dad2b3b310da903401aa62100ab5d1a36553e"
     "06203b33890cc9b832f79ef80560ccb9a39ce767967ed628c6ad573cb116dbef"
     "efd75499da96bd68a8a97b928a8bbc103b6621fcde2beca1231d206be6cd9ec7"
     "aff6f6c94fcd7204ed3455c68c83f4a41da4af2b74ef5c53f1d8ac70bdcb7ed1"
     "85ce81bd84359d44254d95629e9855a94a7c1958d1f8ada5d0532ed8a5aa3fb2"
     "d17ba70eb6248e594e1a2297acbbb39d502f1a8c6eb6f1ce22b3de1a1f40cc24"
     "554119a831a9aad6079cad88425de6bde1a9187ebb6092cf67bf2b13fd65f270"
     "88d78b7e883c8759d2c4f5c65adb7553878ad575f9fad878e80a0c9ba63bcbcc"
     "2732e69485bbc9c90bfbd62481d9089beccf80cfe2df16a2cf65bd92dd597b07"
     "07e0917af48bbb75fed413d238f5555a7a569d80c3414a8d0859dc65a46128ba"
     "b27af87a71314f318c782b23ebfe808b82b0ce26401d2e22f04d83d1255dc51a"
     "ddd3b75a2b1ae0784504df543af8969be3ea7082ff7fc9888c144da2af58429e"
     "c96031dbcad3dad9af0dcbaaaf268cb8fcffead94f3c7ca495e056a9b47acdb7"
     "51fb73e666c6c655ade8297297d07ad1ba5e43f1bca32301651339e22904cc8c"
     "42f58c30c04aafdb038dda0847dd988dcda6f3bfd15c4b4c4525004aa06eeff8"
     "ca61783aacec57fb3d1f92b0fe2fd1a85f6724517b65e614ad6808d6f6ee34df"
     "f7310fdc82aebfd904b01e1dc54b2927094b2db68d6f903b68401adebf5a7e08"
     "d78ff4ef5d63653a65040cf9bfd4aca7984a74d37145986780fc0b16ac451649"
     "de6188a7dbdf191f64b5fc5e2ab47b57f7f7276cd419c17a3ca8e1b939ae49e4"
     "88acba6b965610b5480109c8b17b80e1b7b750dfc7598d5d5011fd2dcc5600a3"
     "2ef5b52a1ecc820e308aa342721aac0943bf6686b64b2579376504ccc493d97e"
     "6aed3fb0f9cd71a43dd497f01f17c0e2cb3797aa2a2f256656168e6c496afc5f"
     "b93246f6b1116398a346f1a641f3b041e989f7914f90cc2c7fff357876e506b5"
     "0d334ba77c225bc307ba537152f3f1610e4eafe595f6d9d90d11faa933a15ef1"
     "369546868a7f3a45a96768d40fd9d03412c091c6315cf4fde7cb68606937380d"
     "b2eaaa707b4c4185c32eddcdd306705e4dc1ffc872eeee475a64dfac86aba41c"
     "0618983f8741c5ef68d3a101e8a3b8cac60c905c15fc910840b94c00a0b9d0",
     "0aab4c900501b3e24d7cdf4663326a3a87df5e4843b2cbdb67cbf6e460fec350"
     "aa5371b1508f9f4528ecea23c436d94b5e8fcd4f681e30a6ac00a9704a188a03"),
    ("TEST SHA(abc)",
     "833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
     "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
     "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
     "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
     "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b589"
     "09351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704"),
]

# RFC 8463 Appendix A.1 and A.2.
RFC8463_ED25519_SEED = "nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A="
RFC8463_ED25519_PUBLIC = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
RFC8463_RSA_PUBLIC = (
    "MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWRiGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQiY/"
    "J16JYi0Qvx/byYzCNb3W91y3FutACDfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9PzoxZyVYLzBf"
    "O2EeC3Ip3G+2kryOTIKT+l/K4w3QIDAQAB")
RFC8463_RECORDS = {
    "brisbane._domainkey.football.example.com": "v=DKIM1; k=ed25519; p=" + RFC8463_ED25519_PUBLIC,
    "test._domainkey.football.example.com": "v=DKIM1; k=rsa; p=" + RFC8463_RSA_PUBLIC,
}
RFC8463_ED25519_B = ("/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11BusFa3bT3FY5OsU7Zbn"
                     "KELq+eXdp1Q1Dw==")
RFC8463_TIME = 1528637909            # t= of the example's signatures


def rfc8463_message():
    with open(os.path.join(HERE, "data", "dkim", "rfc8463-a3.eml"), "rb") as handle:
        return handle.read()


MESSAGE = (b"From: Alice Example <alice@example.test>\r\n"
           b"To: Bob <bob@example.org>\r\n"
           b"Subject: the  quarterly\t figures \r\n"
           b"Date: Sat, 05 Dec 2026 10:00:00 +0000\r\n"
           b"Message-ID: <figures.1@example.test>\r\n"
           b"MIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=us-ascii\r\n"
           b"\r\n"
           b"Hello Bob,  \r\n"
           b"\r\n"
           b"the figures\t are  attached.\r\n"
           b"\r\n"
           b"\r\n")


def body_of(size):
    """A body of about SIZE octets in lines of 76 characters, some with trailing spaces."""
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.  \r\n"
    return line * max(1, size // len(line))


class DictResolver:
    """txt(name) from {name: [str or bytes, ...]}; a missing name is NXDOMAIN, a value
    that is an exception instance is raised. Counts the questions asked."""

    def __init__(self, records):
        self.records = {name.lower().rstrip("."): value for name, value in records.items()}
        self.asked = []

    def txt(self, name):
        self.asked.append(name)
        value = self.records.get(name.lower().rstrip("."))
        if value is None:
            raise dnsstub.NXDomainError("no such name: %s" % name)
        if isinstance(value, Exception):
            raise value
        if isinstance(value, (str, bytes)):
            value = [value]
        return [v.encode() if isinstance(v, str) else v for v in value]


def import_dkimpy():
    """The dkimpy package (import name dkim, like our dkim.py), or None when it is not
    installed. Our dkim module stays what `import dkim` gives elsewhere."""
    ours = sys.modules.pop("dkim", None)
    saved = list(sys.path)
    root = os.path.dirname(HERE)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") not in (root, HERE)]
    try:
        module = importlib.import_module("dkim")
        if os.path.abspath(getattr(module, "__file__", "")) == os.path.join(root, "dkim.py"):
            return None                # ours after all (a virtual environment may sit in root)
        return module
    except ImportError:
        return None
    finally:
        sys.path[:] = saved
        if ours is not None:
            sys.modules["dkim"] = ours
        else:
            sys.modules.pop("dkim", None)


def dkimpy_dnsfunc(records):
    """A dnsfunc for dkimpy from {name: text}: names arrive as bytes with a final dot."""
    table = {name.lower().rstrip("."): text for name, text in records.items()}

    def dnsfunc(name, timeout=5):
        text = table.get(name.decode().lower().rstrip("."))
        return text.encode() if isinstance(text, str) else text
    return dnsfunc
