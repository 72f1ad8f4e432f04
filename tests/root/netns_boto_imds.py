#!/usr/bin/env python3
"""Read instance-id the way boto3/botocore does, on botocore's DEFAULT endpoint.

    netns_boto_imds.py [ipv4|ipv6]

ipv4 uses botocore's built-in http://169.254.169.254/ (no endpoint setting at all); ipv6 sets only
the endpoint *mode* (botocore then uses its built-in http://[fd00:ec2::254]/). IMDSv2 first (token
PUT), exactly like the credential provider. Prints "<base-url> <v2|v1> <instance-id>".
"""

import os
import sys

from botocore.utils import InstanceMetadataFetcher


def main() -> int:
    mode = sys.argv[1] if len(sys.argv) > 1 else "ipv4"
    for name in ("AWS_EC2_METADATA_SERVICE_ENDPOINT", "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE",
                 "AWS_EC2_METADATA_DISABLED"):
        if name in os.environ:
            print(f"{name} is set: this test needs the default endpoint", file=sys.stderr)
            return 2
    config = {"ec2_metadata_service_endpoint_mode": "ipv6"} if mode == "ipv6" else {}
    fetcher = InstanceMetadataFetcher(timeout=3, num_attempts=1, config=config)
    token = fetcher._fetch_metadata_token()
    response = fetcher._get_request("latest/meta-data/instance-id", None, token)
    if response.status_code != 200:
        print(f"HTTP {response.status_code}", file=sys.stderr)
        return 1
    print(fetcher.get_base_url(), "v2" if token else "v1", response.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
